/**
 * Static checks of the Kubernetes packaging (charts/cbt-csi, test-driver.yaml, docs/). No helm, Docker
 * engine or cluster exists where these run, so they check what can be checked without one: the values
 * against their schema, the values the templates reference, the YAML, and that what the chart and the
 * docs tell the driver is what the driver really accepts and advertises.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Ajv } from 'ajv';
import { parse, parseAllDocuments } from 'yaml';
import { afterEach, describe, expect, test } from 'vitest';
import { TOPOLOGY_NODE_KEY, type DriverConfig } from '../../src/config.js';
import { SUPPORTED_ACCESS_MODES, SUPPORTED_FS_TYPES } from '../../src/csi/capabilities.js';
import { CONTROLLER_CAPABILITIES } from '../../src/csi/controller-service.js';
import type { DriverContext } from '../../src/csi/driver-context.js';
import { identityService } from '../../src/csi/identity-service.js';
import { NODE_CAPABILITIES } from '../../src/csi/node-service.js';
import { MUTABLE_PARAMETERS, modifiedAttributes } from '../../src/csi/mutable-parameters.js';
import { parseBlockSize, parseVolumeParameters } from '../../src/csi/volume-parameters.js';
import {
  ControllerServiceCapability_RPC_Type as ControllerRpc,
  NodeServiceCapability_RPC_Type as NodeRpc,
  PluginCapability_Service_Type as PluginService,
  PluginCapability_VolumeExpansion_Type as Expansion,
  VolumeCapability_AccessMode_Mode as Mode,
} from '../../src/gen/csi/v1/csi_pb.js';
import { REPO_ROOT } from '../support/test-driver.js';
import { SIDECAR_NEEDS } from './sidecar-needs.js';
import { makePeerCerts, missingOpenssl } from '../support/peer-certs.js';
import { freePort } from '../support/free-port.js';

const CHART = path.join(REPO_ROOT, 'charts/cbt-csi');
const TEMPLATES = path.join(CHART, 'templates');
const CLI = path.join(REPO_ROOT, 'src/cli.ts');

type Tree = Record<string, unknown>;

const read = (file: string) => fs.readFileSync(file, 'utf8');
const values = parse(read(path.join(CHART, 'values.yaml'))) as Tree;
const schema = JSON.parse(read(path.join(CHART, 'values.schema.json'))) as object;
const templateFiles = fs.readdirSync(TEMPLATES).filter((f) => /\.(ya?ml|tpl|txt)$/.test(f));
const templates = new Map(templateFiles.map((f) => [f, read(path.join(TEMPLATES, f))]));
const podSpec = templates.get('_podspec.tpl')!;

/** The value at a dotted path, or undefined if some key on the way is missing. */
function at(tree: unknown, dotted: string): unknown {
  let node = tree;
  for (const key of dotted.split('.')) {
    if (node === null || typeof node !== 'object' || !(key in node)) return undefined;
    node = (node as Tree)[key];
  }
  return node;
}

function hasPath(tree: unknown, dotted: string): boolean {
  let node = tree;
  for (const key of dotted.split('.')) {
    if (node === null || typeof node !== 'object' || !Object.hasOwn(node, key)) return false;
    node = (node as Tree)[key];
  }
  return true;
}

/**
 * Every values path a template reads: `.Values.a.b` directly, and `$x.c` where `$x := .Values.a`.
 * Paths under a map the chart passes through whole (toYaml, range) count as their map.
 */
function valuesPathsUsed(source: string): string[] {
  const paths = new Set<string>();
  const aliases = new Map<string, string>();
  for (const m of source.matchAll(/\$(\w+)\s*:?=\s*\.Values((?:\.\w+)+)/g)) aliases.set(m[1]!, m[2]!.slice(1));
  for (const m of source.matchAll(/\.Values((?:\.\w+)+)/g)) paths.add(m[1]!.slice(1));
  for (const m of source.matchAll(/\$(\w+)((?:\.\w+)+)/g)) {
    const base = aliases.get(m[1]!);
    if (base) paths.add(`${base}${m[2]}`);
  }
  return [...paths];
}

/** `cbt-csi serve --help`, as the CLI prints it. */
function serveHelp(): string {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, 'serve', '--help'], {
    cwd: REPO_ROOT,
    encoding: 'utf8',
  });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

const flagsOf = (text: string) => new Set([...text.matchAll(/(?:^|\s)--([a-z][a-z0-9-]*)/g)].map((m) => m[1]!));

/** The lines of the driver container (name: cbt-csi) in the pod template, up to the next container. */
function driverContainer(): string {
  const start = podSpec.indexOf('- name: cbt-csi\n');
  const end = podSpec.indexOf('- name: node-driver-registrar');
  expect(start).toBeGreaterThan(0);
  expect(end).toBeGreaterThan(start);
  return podSpec.slice(start, end);
}

/**
 * The driver's arguments as the chart renders them with these values. The arg lines are simple
 * enough to render here: `{{ .Values.x }}` substitutions, each optional flag inside one
 * `with`/`if` whose condition is read from the values.
 */
function renderDriverArgs(v: Tree, release = { name: 'cbt-csi', chart: 'cbt-csi' }): string[] {
  const block = driverContainer();
  const argsBlock = block.slice(block.indexOf('args:'), block.indexOf('env:'));
  const args: string[] = [];
  let skip = false;
  let withValue: unknown;
  for (const raw of argsBlock.split('\n')) {
    const line = raw.trim();
    const withM = /^\{\{-? with \.Values\.([\w.]+) \}\}$/.exec(line);
    const gtM = /^\{\{-? if gt \(int \.Values\.([\w.]+)\) 0 \}\}$/.exec(line);
    if (/^\{\{-? if \$daemonset \}\}$/.test(line)) {
      skip = v.mode !== 'daemonset';
      continue;
    }
    if (withM) {
      withValue = at(v, withM[1]!);
      skip =
        withValue === undefined ||
        withValue === null ||
        withValue === '' ||
        withValue === 0 ||
        withValue === false ||
        (Array.isArray(withValue) && withValue.length === 0);
      continue;
    }
    if (gtM) {
      skip = !(Number(at(v, gtM[1]!)) > 0);
      continue;
    }
    if (/^\{\{-? end \}\}$/.test(line)) {
      skip = false;
      continue;
    }
    if (line.startsWith('{{')) throw new Error(`renderDriverArgs cannot render: ${line}`);
    if (!line.startsWith('- ') || skip) continue;
    args.push(
      line
        .slice(2)
        .replace(/\{\{ \. \}\}/g, String(withValue))
        .replace(/\{\{ \.Chart\.Name \}\}/g, release.chart)
        .replace(/\{\{ \.Release\.Name \}\}/g, release.name)
        .replace(/\{\{ \.Values\.([\w.]+) \}\}/g, (_, p: string) => String(at(v, p))),
    );
  }
  return args;
}

// ------------------------------------------------------------------ fixtures

const dirs: string[] = [];
const children: ChildProcess[] = [];

afterEach(async () => {
  for (const child of children.splice(0)) {
    // Each command runs in its own process group (npm start runs tsx, which runs node): end all of it.
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
    if (child.exitCode === null && child.signalCode === null)
      await new Promise((resolve) => child.once('exit', resolve));
  }
  for (const dir of dirs.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-csi-packaging-'));
  dirs.push(dir);
  return dir;
}

/** Runs a command line from the docs (argv, no shell) until it prints `listening on`, or it exits. */
function startUntilListening(
  argv: string[],
  env: NodeJS.ProcessEnv = {},
): Promise<{ child: ChildProcess; stderr: string }> {
  const child = spawn(argv[0]!, argv.slice(1), {
    cwd: REPO_ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  children.push(child);
  let stderr = '';
  child.stdout!.on('data', () => undefined);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not listening after 60 s: ${stderr}`)), 60_000);
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (stderr.includes('listening on')) {
        clearTimeout(timer);
        resolve({ child, stderr });
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`exited with ${code}: ${stderr}`));
    });
  });
}

/** Fenced code blocks of a markdown file, with their info string. */
function codeBlocks(markdown: string): { lang: string; body: string }[] {
  return [...markdown.matchAll(/^```(\w*)\n([\s\S]*?)^```$/gm)].map((m) => ({ lang: m[1]!, body: m[2]! }));
}

// ------------------------------------------------------------------ values

describe('values.yaml and values.schema.json', () => {
  const ajv = new Ajv({ allErrors: true, strict: false });
  const validate = ajv.compile(schema);

  test('values.yaml validates against values.schema.json', () => {
    expect(validate(values), JSON.stringify(validate.errors, null, 2)).toBe(true);
  });

  test('the schema rejects unknown keys, bad enums and a certManager TLS without a CA', () => {
    const copy = () => structuredClone(values);
    const typo = copy();
    (typo.driver as Tree).stateDirr = '/x';
    expect(validate(typo)).toBe(false);
    const mode = copy();
    mode.mode = 'replicated';
    expect(validate(mode)).toBe(false);
    const certManager = copy();
    ((certManager.snapshotMetadata as Tree).tls as Tree).mode = 'certManager';
    expect(validate(certManager)).toBe(false);
  });

  test('every .Values path a template reads exists in values.yaml', () => {
    const missing: string[] = [];
    for (const [file, source] of templates) {
      for (const p of valuesPathsUsed(source)) if (!hasPath(values, p)) missing.push(`${file}: .Values.${p}`);
    }
    expect(missing).toEqual([]);
  });

  test('every values.yaml leaf is read by some template (no dead settings)', () => {
    const used = [...templates.values()].flatMap(valuesPathsUsed);
    const leaves: string[] = [];
    const walk = (node: unknown, prefix: string) => {
      if (node !== null && typeof node === 'object' && !Array.isArray(node) && Object.keys(node).length > 0) {
        for (const [k, v] of Object.entries(node)) walk(v, prefix ? `${prefix}.${k}` : k);
      } else leaves.push(prefix);
    };
    walk(values, '');
    // A leaf is read when the template reads it or a map above it (toYaml, range over the map).
    const unread = leaves.filter((leaf) => !used.some((u) => leaf === u || leaf.startsWith(`${u}.`)));
    expect(unread).toEqual([]);
  });
});

// ------------------------------------------------------------------ templates and YAML

describe('chart files', () => {
  test.each(templateFiles)('%s: every {{ has its }}, and every block (if/with/range/define) its end', (file) => {
    const source = templates.get(file)!;
    expect(source.split('{{').length).toBe(source.split('}}').length);
    const actions = [...source.matchAll(/\{\{-?\s*(\/\*[\s\S]*?\*\/|[\s\S]*?)\s*-?\}\}/g)].map((m) => m[1]!.trim());
    const opens = actions.filter((a) => /^(if|with|range|define)\b/.test(a)).length;
    const ends = actions.filter((a) => a === 'end').length;
    expect(ends).toBe(opens);
  });

  const yamlFiles = [
    path.join(CHART, 'Chart.yaml'),
    path.join(CHART, 'values.yaml'),
    path.join(REPO_ROOT, 'test-driver.yaml'),
    ...fs
      .readdirSync(path.join(REPO_ROOT, 'docs'), { recursive: true, encoding: 'utf8' })
      .filter((f) => /\.ya?ml$/.test(f))
      .map((f) => path.join(REPO_ROOT, 'docs', f)),
  ];
  test.each(yamlFiles.map((f) => path.relative(REPO_ROOT, f)))('%s parses as YAML', (file) => {
    for (const doc of parseAllDocuments(read(path.join(REPO_ROOT, file)))) expect(doc.errors).toEqual([]);
  });

  const docsYaml = fs
    .readdirSync(path.join(REPO_ROOT, 'docs'))
    .filter((f) => f.endsWith('.md'))
    .flatMap((f) =>
      codeBlocks(read(path.join(REPO_ROOT, 'docs', f)))
        .filter((b) => b.lang === 'yaml')
        .map((b, i) => [`${f} #${i + 1}`, b.body] as const),
    );
  test.each(docsYaml)('manifest %s in the docs parses, and each document has apiVersion and kind', (_name, body) => {
    const docs = parseAllDocuments(body);
    expect(docs.length).toBeGreaterThan(0);
    for (const doc of docs) {
      expect(doc.errors).toEqual([]);
      const obj = doc.toJS() as Tree;
      expect(typeof obj.apiVersion).toBe('string');
      expect(typeof obj.kind).toBe('string');
    }
  });

  test('Chart.yaml names the chart and a semver version', () => {
    const chart = parse(read(path.join(CHART, 'Chart.yaml'))) as Tree;
    expect(chart.apiVersion).toBe('v2');
    expect(chart.name).toBe('cbt-csi');
    expect(String(chart.version)).toMatch(/^\d+\.\d+\.\d+$/);
    const pkg = JSON.parse(read(path.join(REPO_ROOT, 'package.json'))) as { version: string };
    expect(chart.appVersion).toBe(pkg.version);
  });
});

// ------------------------------------------------------------------ the driver's flags

describe('what the chart tells the driver', () => {
  const help = serveHelp();
  const cliFlags = flagsOf(help);

  test('every flag the chart passes to the driver container is a flag of `cbt-csi serve`', () => {
    const chartFlags = flagsOf(driverContainer().split('env:')[0]!);
    expect(chartFlags.size).toBeGreaterThan(5);
    expect([...chartFlags].filter((f) => !cliFlags.has(f))).toEqual([]);
  });

  test('the chart runs the driver with every service (--role=all) on the socket the sidecars use', () => {
    const args = renderDriverArgs(values);
    expect(args).toContain('--role=all');
    expect(args).toContain('--endpoint=unix:///csi/csi.sock');
    expect(podSpec.match(/--csi-address=\/csi\/csi\.sock/g)?.length).toBe(6);
  });

  test('the driver starts with the arguments the chart renders from values.yaml', async () => {
    const dir = tempDir();
    const args = renderDriverArgs(values).map((a) => {
      // Paths of the pod (socket, hostPath state dir) and a fixed port become ones a test may use.
      if (a.startsWith('--endpoint=')) return `--endpoint=unix://${dir}/csi.sock`;
      if (a.startsWith('--state-dir=')) return `--state-dir=${dir}/state`;
      if (a.startsWith('--metrics-address=')) return '--metrics-address=127.0.0.1:0';
      return a;
    });
    const { stderr } = await startUntilListening([process.execPath, '--import', 'tsx', CLI, 'serve', ...args], {
      NODE_NAME: 'node-a',
    });
    expect(stderr).toContain(`listening on unix://${dir}/csi.sock`);
  });

  test('optional driver flags render from their values, and the driver accepts them', async () => {
    const v = structuredClone(values);
    Object.assign(v.driver as Tree, {
      capacity: '10Gi',
      maxVolumesPerNode: 7,
      metricsPort: 0,
      defaultBlockSize: '64Ki',
    });
    const args = renderDriverArgs(v);
    expect(args).toContain('--capacity=10Gi');
    expect(args).toContain('--max-volumes-per-node=7');
    expect(args).toContain('--default-block-size=64Ki');
    expect(args.some((a) => a.startsWith('--metrics-address'))).toBe(false);
    const dir = tempDir();
    const local = args.map((a) =>
      a.startsWith('--endpoint=')
        ? `--endpoint=unix://${dir}/csi.sock`
        : a.startsWith('--state-dir=')
          ? `--state-dir=${dir}/state`
          : a,
    );
    await startUntilListening([process.execPath, '--import', 'tsx', CLI, 'serve', ...local], { NODE_NAME: 'node-a' });
  });

  test('driver.faults: --faults only when there are rules, naming a file under the faults ConfigMap mount', () => {
    expect(renderDriverArgs(values).some((a) => a.startsWith('--faults'))).toBe(false);
    const v = structuredClone(values);
    (v.driver as Tree).faults = [{ rpc: 'GetMetadataDelta', action: 'failed-precondition' }];
    const arg = renderDriverArgs(v).find((a) => a.startsWith('--faults='));
    expect(arg).toBe('--faults=/etc/cbt-csi/faults/faults.yaml');
    expect(podSpec).toMatch(/- name: faults\n\s+mountPath: \/etc\/cbt-csi\/faults\n\s+readOnly: true/);
    expect(podSpec).toMatch(/- name: faults\n\s+configMap:\n\s+name: \{\{ include "cbt-csi.fullname" \. \}\}-faults/);
    expect(templates.get('faults.yaml')).toContain('name: {{ include "cbt-csi.fullname" $ }}-faults');
  });

  test('mode daemonset gives the driver a mutual-TLS peer listener and pod discovery; mode single gives it none', async () => {
    expect(renderDriverArgs(values).filter((a) => a.startsWith('--peer'))).toEqual([]);
    const v = { ...structuredClone(values), mode: 'daemonset' };
    const args = renderDriverArgs(v, { name: 'rel', chart: 'cbt-csi' });
    expect(args).toEqual(
      expect.arrayContaining([
        `--peer-listen=$(POD_IP):${(values.peer as { port: number }).port}`,
        '--peer-discovery=kubernetes',
        '--peer-namespace=$(POD_NAMESPACE)',
      ]),
    );
    // The selector is the plugin pods' labels (the DaemonSet's selectorLabels).
    const selectorLabels = templates
      .get('_helpers.tpl')!
      .split('define "cbt-csi.selectorLabels"')[1]!
      .split('{{- end -}}')[0]!
      .split('\n')
      .map((l) => /^([\w./-]+): (.+)$/.exec(l.trim()))
      .filter((m): m is RegExpExecArray => m !== null)
      .map(
        ([, k, val]) => `${k}=${val!.replace('{{ .Chart.Name }}', 'cbt-csi').replace('{{ .Release.Name }}', 'rel')}`,
      );
    expect(selectorLabels).toHaveLength(3);
    const selector = args
      .find((a) => a.startsWith('--peer-pod-selector='))!
      .split('=')
      .slice(1)
      .join('=');
    expect(selector.split(',').sort()).toEqual(selectorLabels.sort());
    // The driver starts with them, as kubelet gives them ($(VAR) from the pod's env; the Secret's files).
    const missing = missingOpenssl();
    if (missing) {
      if (process.env.CI === 'true') throw new Error(missing);
      return;
    }
    const dir = tempDir();
    const certs = makePeerCerts(path.join(dir, 'certs')).valid;
    const port = await freePort();
    const local = args.map((a) =>
      a
        .replace(/^--endpoint=.*/, `--endpoint=unix://${dir}/csi.sock`)
        .replace(/^--state-dir=.*/, `--state-dir=${dir}/state`)
        .replace(/^--metrics-address=.*/, '--metrics-address=127.0.0.1:0')
        .replace(/^--peer-listen=.*/, `--peer-listen=127.0.0.1:${port}`)
        .replace(/^--peer-tls-cert=.*/, `--peer-tls-cert=${certs.cert}`)
        .replace(/^--peer-tls-key=.*/, `--peer-tls-key=${certs.key}`)
        .replace(/^--peer-tls-ca=.*/, `--peer-tls-ca=${certs.ca}`)
        .replace('$(NODE_NAME)', 'node-a')
        .replace('$(POD_NAMESPACE)', 'storage'),
    );
    const { stderr } = await startUntilListening([process.execPath, '--import', 'tsx', CLI, 'serve', ...local]);
    expect(stderr).toContain(`cbt-csi peers at 127.0.0.1:${port} (mutual TLS)`);
  });

  test('the driver name in values is the driver default and the e2e definition name', () => {
    expect(help).toContain(`(default: "${String(values.driverName)}")`);
    const e2e = parse(read(path.join(REPO_ROOT, 'test-driver.yaml'))) as { DriverInfo: { Name: string } };
    expect(e2e.DriverInfo.Name).toBe(values.driverName);
  });

  test("the StorageClass's parameters are ones parseVolumeParameters accepts, with the fsType the node can make", () => {
    const sc = values.storageClass as { parameters: Record<string, string>; fsType: string };
    const defaults = { blockSize: 4096, metadataStyle: 'VARIABLE' as const };
    const rendered = { 'csi.storage.k8s.io/fstype': sc.fsType, ...sc.parameters };
    expect(() => parseVolumeParameters(rendered, defaults)).not.toThrow();
    expect(SUPPORTED_FS_TYPES).toContain(sc.fsType);
    const provisioner = (values.sidecars as Tree).provisioner as { defaultFsType: string };
    expect(SUPPORTED_FS_TYPES).toContain(provisioner.defaultFsType);
    // The same parameters with a key the driver does not know would fail provisioning.
    expect(() => parseVolumeParameters({ ...rendered, blocksize: '4096' }, defaults)).toThrow(/unknown parameter/);
  });

  test("the example VolumeAttributesClass's parameters are mutable parameters the driver accepts, and the schema allows only those keys", () => {
    const vac = values.volumeAttributesClass as { parameters: Record<string, string> };
    expect(Object.keys(vac.parameters).length).toBeGreaterThan(0);
    expect(() => modifiedAttributes(vac.parameters, {}, 'exact')).not.toThrow();
    const schemaKeys = Object.keys(
      at(schema, 'properties.volumeAttributesClass.properties.parameters.properties') as Tree,
    ).sort();
    expect(schemaKeys).toEqual([...MUTABLE_PARAMETERS].sort());
    // blockSize is a StorageClass parameter, never a mutable one: the driver refuses it, the schema too.
    expect(() => modifiedAttributes({ blockSize: '4096' }, {}, 'exact')).toThrow(/"blockSize" cannot change/);
    const ajv = new Ajv({ allErrors: true, strict: false });
    const withBlockSize = structuredClone(values);
    ((withBlockSize.volumeAttributesClass as Tree).parameters as Tree).blockSize = '4096';
    expect(ajv.validate(schema, withBlockSize)).toBe(false);
  });

  test('volumeAttributesClass.create turns VolumeAttributesClass on in csi-provisioner and csi-resizer (their --feature-gates flag)', () => {
    const gated = (container: string) => {
      const start = podSpec.indexOf(`- name: ${container}`);
      const block = podSpec.slice(start, podSpec.indexOf('- name: ', start + 10));
      return /\{\{- if \.Values\.volumeAttributesClass\.create \}\}\s*\n(\s*#.*\n)*\s*- --feature-gates=VolumeAttributesClass=true\n\s*\{\{- end \}\}/.test(
        block,
      );
    };
    expect(gated('csi-provisioner')).toBe(true);
    expect(gated('csi-resizer')).toBe(true);
    const vac = templates.get('volumeattributesclass.yaml')!;
    expect(vac).toContain('kind: VolumeAttributesClass');
    expect(vac).toContain('apiVersion: storage.k8s.io/v1');
    expect(vac).toContain('driverName: {{ .Values.driverName }}');
  });

  test('the schema allows only block sizes the driver accepts (power of two, 4Ki to 1Mi)', () => {
    const driver = values.driver as { defaultBlockSize: string };
    expect(() => parseBlockSize(driver.defaultBlockSize)).not.toThrow();
    const sc = (values.storageClass as { parameters: { blockSize: string } }).parameters;
    expect(() => parseBlockSize(sc.blockSize)).not.toThrow();
  });
});

// ------------------------------------------------------------------ sidecars

describe('sidecars', () => {
  const sidecars = values.sidecars as Record<string, { image: { repository: string; tag: string } }>;
  const images = {
    ...Object.fromEntries(Object.entries(sidecars).map(([k, v]) => [k, v.image])),
    snapshotMetadata: (values.snapshotMetadata as { image: { repository: string; tag: string } }).image,
  };
  const version = (tag: string) => tag.slice(1).split('.').map(Number) as [number, number, number];
  const atLeast = (tag: string, min: string) => {
    const [a, b, c] = version(tag);
    const [x, y, z] = version(min);
    return a !== x ? a > x : b !== y ? b > y : c >= z;
  };

  // The first releases built on CSI spec v1.12 (provisioner v6.0.0, resizer v2.0.0, per their
  // changelogs), and the first csi-snapshot-metadata serving the v1beta1 SnapshotMetadataService.
  const minimum: Record<string, string> = {
    provisioner: 'v6.0.0',
    snapshotter: 'v8.0.0',
    resizer: 'v2.0.0',
    nodeDriverRegistrar: 'v2.13.0',
    livenessProbe: 'v2.15.0',
    snapshotMetadata: 'v1.0.0',
  };

  test.each(Object.entries(images))('%s is pinned to a released registry.k8s.io/sig-storage image', (name, image) => {
    expect(image.repository).toMatch(/^registry\.k8s\.io\/sig-storage\//);
    expect(image.tag).toMatch(/^v\d+\.\d+\.\d+$/);
    expect(atLeast(image.tag, minimum[name]!), `${name} ${image.tag} < ${minimum[name]}`).toBe(true);
  });

  test('every sidecar image is the version pinned in scripts/ecosystem/versions.json (what CI builds and tests)', () => {
    const pins = (
      JSON.parse(read(path.join(REPO_ROOT, 'scripts/ecosystem/versions.json'))) as {
        components: Record<string, { version: string; images?: Record<string, string> }>;
      }
    ).components;
    const pinned = Object.values(pins).flatMap((c) =>
      Object.entries(c.images ?? {}).map(([valuesPath, repository]) => ({ valuesPath, repository, tag: c.version })),
    );
    // Every image in values.yaml has a pin, and every pin is an image in values.yaml.
    expect(pinned.map((p) => p.valuesPath).sort()).toEqual(
      Object.keys(images)
        .map((k) => (k === 'snapshotMetadata' ? 'snapshotMetadata.image' : `sidecars.${k}.image`))
        .sort(),
    );
    for (const p of pinned)
      expect(at(values, p.valuesPath), p.valuesPath).toEqual({ repository: p.repository, tag: p.tag });
  });

  test('every sidecar that talks to the API server is built by CI at its image tag, so the headless cluster runs what the chart deploys', () => {
    // Found by the headless cluster: the chart's csi-resizer v2.2.1 was not served by the Go module proxy, so
    // no test could ever run it; the chart now deploys v2.3.0, which CI builds.
    const pins = (
      JSON.parse(read(path.join(REPO_ROOT, 'scripts/ecosystem/versions.json'))) as {
        components: Record<
          string,
          { version: string; images?: Record<string, string>; buildable?: boolean; binaries: Record<string, string> }
        >;
      }
    ).components;
    const apiSidecars: Record<string, string> = {
      provisioner: 'sidecars.provisioner.image',
      snapshotter: 'sidecars.snapshotter.image',
      resizer: 'sidecars.resizer.image',
      'snapshot-metadata': 'snapshotMetadata.image',
    };
    // The driver itself (mode daemonset lists its peer pods) is our image, not an upstream sidecar.
    const upstream = Object.keys(SIDECAR_NEEDS).filter((name) => name !== 'driver');
    expect(Object.keys(apiSidecars).sort()).toEqual(upstream.sort());
    for (const [sidecar, valuesPath] of Object.entries(apiSidecars)) {
      const [name, pin] = Object.entries(pins).find(([, c]) => valuesPath in (c.images ?? {}))!;
      expect(pin.buildable, `${name} (${sidecar}) must be buildable`).not.toBe(false);
      expect(Object.keys(pin.binaries).length, `${name} builds no program`).toBeGreaterThan(0);
      expect((at(values, valuesPath) as { tag: string }).tag).toBe(pin.version);
    }
  });

  test('the SnapshotMetadataService uses the API version the pinned sidecar serves (v1beta1 from v1.0.0)', () => {
    const source = templates.get('snapshot-metadata.yaml')!;
    expect(source).toContain('apiVersion: cbt.storage.k8s.io/v1beta1');
    expect(source).toMatch(/caCert: \{\{ \$caPem \| b64enc \}\}/);
  });

  test('the driver container is privileged, with kubelet dir and state dir mounted Bidirectional, and /dev', () => {
    const block = driverContainer();
    expect(block).toMatch(/privileged: true/);
    expect(block).toMatch(/mountPath: \{\{ \.Values\.kubeletDir \}\}\n\s+mountPropagation: Bidirectional/);
    expect(block).toMatch(/mountPath: \{\{ \.Values\.driver\.stateDir \}\}\n\s+mountPropagation: Bidirectional/);
    expect(block).toMatch(/mountPath: \/dev\n/);
  });
});

// ------------------------------------------------------------------ RBAC

/** An RBAC rule as the API server reads it. */
interface Rule {
  apiGroups: string[];
  resources: string[];
  verbs: string[];
  resourceNames?: string[];
}
interface RbacObject {
  kind: string;
  metadata: { name: string; namespace?: string };
  rules?: Rule[];
  roleRef?: { kind: string; name: string };
  subjects?: { kind: string; name: string; namespace?: string }[];
}

/** Stand-ins for what the RBAC templates interpolate: release name, namespace, one backup client. */
const RELEASE = 'rel-cbt-csi';
const NAMESPACE = 'storage';
const CLIENT = { namespace: 'backup', name: 'backup-app' };

/**
 * The objects of an RBAC template with every branch taken (mode single, every sidecar on, one entry in
 * each range): the most the chart can grant. Control lines are dropped and the few interpolations
 * these templates use are substituted; any other interpolation is an error, so the stand-in cannot
 * silently drift from the template.
 */
function renderRbacTemplate(file: string): RbacObject[] {
  const source = templates.get(file)!.replace(/\{\{-?\s*\/\*[\s\S]*?\*\/\s*-?\}\}/g, '');
  const substitutions: Record<string, string> = {
    $fullname: RELEASE,
    'include "cbt-csi.fullname" .': RELEASE,
    '.Release.Namespace': NAMESPACE,
    '.namespace': CLIENT.namespace,
    '.name': CLIENT.name,
    '.name | quote': JSON.stringify(CLIENT.name),
    $bindingName: `${RELEASE}-backup-client-${CLIENT.namespace}-${CLIENT.name}`,
    $tokenRole: `${RELEASE}-backup-client-token-${CLIENT.name}`,
  };
  const lines = source
    .split('\n')
    .filter(
      (line) => !/^\s*\{\{-?\s*(if|else|end|range|with|\$\w+\s*:=|include "cbt-csi\.labels")[^}]*\}\}\s*$/.test(line),
    )
    .map((line) =>
      line.replace(/\{\{-?\s*(.*?)\s*-?\}\}/g, (_, expr: string) => {
        const value = substitutions[expr];
        if (value === undefined) throw new Error(`${file}: no stand-in for {{ ${expr} }}`);
        return value;
      }),
    );
  return parseAllDocuments(lines.join('\n'))
    .map((doc) => doc.toJS() as RbacObject | null)
    .filter((o): o is RbacObject => o !== null && o.kind !== 'ServiceAccount');
}

const rbacFiles = templateFiles.filter((f) => templates.get(f)!.includes('apiVersion: rbac.authorization.k8s.io/v1'));
const rbacObjects = rbacFiles.flatMap(renderRbacTemplate);
const roles = rbacObjects.filter((o) => o.kind === 'ClusterRole' || o.kind === 'Role');
const bindings = rbacObjects.filter((o) => o.kind === 'ClusterRoleBinding' || o.kind === 'RoleBinding');

const matches = (granted: string[], wanted: string) => granted.includes(wanted) || granted.includes('*');
/** Whether a rule grants `verb` on group/resource (any object of it when resourceNames is empty). */
const grants = (rule: Rule, group: string, resource: string, verb: string) =>
  matches(rule.apiGroups, group) && matches(rule.resources, resource) && matches(rule.verbs, verb);

/** The roles bound to a ServiceAccount: ClusterRoles by ClusterRoleBinding (everywhere), Roles and ClusterRoles by RoleBinding (their namespace). */
function rolesBoundTo(sa: { name: string; namespace: string }, roleNames?: Set<string>) {
  const bound: { role: RbacObject; scope: 'cluster' | string }[] = [];
  for (const b of bindings) {
    if (!b.subjects?.some((s) => s.kind === 'ServiceAccount' && s.name === sa.name && s.namespace === sa.namespace))
      continue;
    const role = roles.find(
      (r) =>
        r.kind === b.roleRef!.kind &&
        r.metadata.name === b.roleRef!.name &&
        (r.kind === 'ClusterRole' || r.metadata.namespace === b.metadata.namespace),
    );
    if (!role || (roleNames && !roleNames.has(role.metadata.name))) continue;
    bound.push({ role, scope: b.kind === 'ClusterRoleBinding' ? 'cluster' : b.metadata.namespace! });
  }
  return bound;
}

describe('RBAC', () => {
  test('the plugin pod runs as the ServiceAccount the sidecar roles are bound to', () => {
    expect(podSpec).toContain('serviceAccountName: {{ include "cbt-csi.fullname" . }}');
    expect(templates.get('rbac.yaml')).toMatch(
      /kind: ServiceAccount\nmetadata:\n\s+name: \{\{ \$fullname \}\}\n\s+namespace: \{\{ \.Release\.Namespace \}\}/,
    );
  });

  test.each(Object.entries(SIDECAR_NEEDS).map(([sidecar, { source, needs }]) => [sidecar, source, needs] as const))(
    'the %s roles alone grant everything that sidecar needs (%s)',
    (sidecar, _source, needs) => {
      // Only this sidecar's own roles count, though the pod's containers share one ServiceAccount.
      const own = rolesBoundTo({ name: RELEASE, namespace: NAMESPACE }, new Set([`${RELEASE}-${sidecar}`]));
      expect(own.length).toBeGreaterThan(0);
      const missing: string[] = [];
      for (const n of needs) {
        for (const verb of n.verbs) {
          const ok = own.some(
            ({ role, scope }) =>
              (scope === 'cluster' || (n.scope === 'namespace' && scope === NAMESPACE)) &&
              role.rules!.some((rule) => !rule.resourceNames?.length && grants(rule, n.group, n.resource, verb)),
          );
          if (!ok) missing.push(`${verb} ${n.group || 'core'}/${n.resource} (${n.scope})`);
        }
      }
      expect(missing).toEqual([]);
    },
  );

  test('no ClusterRole grants serviceaccounts/token create (it would mint tokens for any ServiceAccount)', () => {
    const offenders = roles
      .filter((r) => r.kind === 'ClusterRole')
      .filter((r) => r.rules!.some((rule) => grants(rule, '', 'serviceaccounts/token', 'create')))
      .map((r) => r.metadata.name);
    expect(offenders).toEqual([]);
  });

  test('a backup client may request tokens only for itself, in its own namespace, and read snapshots cluster-wide', () => {
    const bound = rolesBoundTo(CLIENT);
    const tokenGrants = bound.flatMap(({ role, scope }) =>
      role
        .rules!.filter((rule) => grants(rule, '', 'serviceaccounts/token', 'create'))
        .map((rule) => ({ scope, names: rule.resourceNames ?? [] })),
    );
    expect(tokenGrants).toEqual([{ scope: CLIENT.namespace, names: [CLIENT.name] }]);
    const clusterRules = bound.filter((b) => b.scope === 'cluster').flatMap(({ role }) => role.rules!);
    const reads: [string, string, string][] = [
      ['snapshot.storage.k8s.io', 'volumesnapshots', 'get'],
      ['snapshot.storage.k8s.io', 'volumesnapshots', 'list'],
      ['snapshot.storage.k8s.io', 'volumesnapshotcontents', 'get'],
      ['cbt.storage.k8s.io', 'snapshotmetadataservices', 'get'],
      ['cbt.storage.k8s.io', 'snapshotmetadataservices', 'list'],
    ];
    for (const [g, r, v] of reads)
      expect(
        clusterRules.some((rule) => grants(rule, g, r, v)),
        `${v} ${g}/${r}`,
      ).toBe(true);
    // Read only: nothing cluster-wide that writes.
    const writes = clusterRules.filter((rule) => rule.verbs.some((v) => !['get', 'list', 'watch'].includes(v)));
    expect(writes).toEqual([]);
  });

  test('NOTES.txt binds backup clients cluster-wide only to the read-only role, and tokens with a Role in their namespace', () => {
    const notes = templates.get('NOTES.txt')!;
    const clusterBindings = [
      ...notes.matchAll(/kubectl create clusterrolebinding .*--clusterrole=(\{\{.*?\}\}|\S+)/g),
    ].map((m) => m[1]!);
    expect(clusterBindings).toEqual(['{{ $role }}']);
    expect(notes).toContain('{{- $role := printf "%s-backup-client" (include "cbt-csi.fullname" .) }}');
    expect(notes).toMatch(
      /kubectl -n <ns> create role <sa>-token --verb=create --resource=serviceaccounts\/token --resource-name=<sa>/,
    );
    expect(notes).toMatch(/kubectl -n <ns> create rolebinding <sa>-token --role=<sa>-token --serviceaccount=<ns>:<sa>/);
  });
});

describe('the snapshot-metadata audience', () => {
  const audienceHelper = 'include "cbt-csi.snapshotMetadataAudience" .';

  test('the SnapshotMetadataService audience and the sidecar --audience come from one helper', () => {
    expect(templates.get('snapshot-metadata.yaml')).toContain(`audience: {{ ${audienceHelper} }}`);
    expect(podSpec).toContain(`--audience={{ ${audienceHelper} }}`);
  });

  test('the audience value is read in one place only, the helper', () => {
    const readers = [...templates]
      .filter(([, source]) => source.includes('.Values.snapshotMetadata.audience'))
      .map(([file]) => file);
    expect(readers).toEqual(['_helpers.tpl']);
    expect(templates.get('_helpers.tpl')!.match(/\.Values\.snapshotMetadata\.audience/g)).toHaveLength(1);
    expect(templates.get('_helpers.tpl')).toMatch(
      /define "cbt-csi\.snapshotMetadataAudience" -\}\}\n\{\{- \.Values\.snapshotMetadata\.audience -\}\}/,
    );
  });
});

describe('requireBaseSnapshotForDelta (a SnapshotMetadataService field newer than external-snapshot-metadata v1.1.0)', () => {
  const ajv = new Ajv({ allErrors: true, strict: false });
  const validate = ajv.compile(schema);
  const withValue = (value: unknown) => {
    const v = structuredClone(values);
    (v.snapshotMetadata as Tree).requireBaseSnapshotForDelta = value;
    return v;
  };
  const source = templates.get('snapshot-metadata.yaml')!;

  test('defaults to null: the field is left out, since a CRD up to v1.1.0 would refuse or drop it', () => {
    expect(hasPath(values, 'snapshotMetadata.requireBaseSnapshotForDelta')).toBe(true);
    expect(at(values, 'snapshotMetadata.requireBaseSnapshotForDelta')).toBeNull();
  });

  test('the schema takes true, false or null, and nothing else', () => {
    for (const ok of [true, false, null]) expect(validate(withValue(ok)), JSON.stringify(ok)).toBe(true);
    for (const bad of ['false', 'true', 0, 1, {}]) expect(validate(withValue(bad)), JSON.stringify(bad)).toBe(false);
  });

  test('the template writes the field only inside a guard that the value is a boolean', () => {
    const field = source.indexOf('  requireBaseSnapshotForDelta: {{ $sm.requireBaseSnapshotForDelta }}');
    const guard = source.indexOf('{{- if kindIs "bool" $sm.requireBaseSnapshotForDelta }}');
    expect(guard).toBeGreaterThan(0);
    expect(field).toBeGreaterThan(guard);
    // Every block opened between the guard and the field is closed there: the field is inside the guard.
    const between = source.slice(guard, field);
    expect(between.match(/\{\{-? *if /g)?.length).toBe((between.match(/\{\{-? *end *-?\}\}/g)?.length ?? 0) + 1);
    expect(source.match(/^ {2}requireBaseSnapshotForDelta:/gm)).toHaveLength(1);
  });

  test('false is refused where it would be untrue: a profile that refuses deleted bases, or records that never last', () => {
    expect(source).toMatch(
      /fail "snapshotMetadata\.requireBaseSnapshotForDelta: false does not hold with metadataProfile/,
    );
    expect(source).toMatch(/deletedSnapshotMaxPerVolume\) 0\)/);
    expect(source).toMatch(/deletedSnapshotRetentionDays\) 0\.0\)/);
  });

  test('docs/for-backup-vendors.md documents the value and the field', () => {
    const doc = read(path.join(REPO_ROOT, 'docs/for-backup-vendors.md'));
    expect(doc).toContain('snapshotMetadata.requireBaseSnapshotForDelta');
    expect(doc).toContain('--set snapshotMetadata.requireBaseSnapshotForDelta=false');
  });
});

// ------------------------------------------------------------------ test-driver.yaml

describe('test-driver.yaml claims exactly what the driver advertises', () => {
  const e2e = parse(read(path.join(REPO_ROOT, 'test-driver.yaml'))) as {
    DriverInfo: {
      Capabilities: Record<string, boolean>;
      TopologyKeys: string[];
      SupportedFsType: Record<string, unknown>;
    };
  };
  const caps = e2e.DriverInfo.Capabilities;
  const ctx = { config: { driverName: 'cbt.csi.dev' } as DriverConfig } as DriverContext;
  const plugin = (
    identityService(ctx).getPluginCapabilities as () => {
      capabilities: { type: { case: string; value: { type: number } } }[];
    }
  )();
  const pluginService = (t: PluginService) =>
    plugin.capabilities.some((c) => c.type.case === 'service' && c.type.value.type === t);
  const online = plugin.capabilities.some(
    (c) => c.type.case === 'volumeExpansion' && c.type.value.type === Expansion.ONLINE,
  );
  const controller = (t: ControllerRpc) => CONTROLLER_CAPABILITIES.includes(t);
  const node = (t: NodeRpc) => NODE_CAPABILITIES.includes(t);
  const multiNode = SUPPORTED_ACCESS_MODES.some((m) => Mode[m]!.startsWith('MULTI_NODE'));

  test.each([
    ['snapshotDataSource', controller(ControllerRpc.CREATE_DELETE_SNAPSHOT)],
    ['pvcDataSource', controller(ControllerRpc.CLONE_VOLUME)],
    ['controllerExpansion', controller(ControllerRpc.EXPAND_VOLUME)],
    ['nodeExpansion', node(NodeRpc.EXPAND_VOLUME)],
    ['onlineExpansion', online],
    ['topology', pluginService(PluginService.VOLUME_ACCESSIBILITY_CONSTRAINTS)],
    ['readWriteOncePod', controller(ControllerRpc.SINGLE_NODE_MULTI_WRITER) && node(NodeRpc.SINGLE_NODE_MULTI_WRITER)],
    ['RWX', multiNode],
    ['capReadOnlyMany', multiNode],
  ] as const)('%s is claimed exactly when the driver advertises it', (cap, advertised) => {
    expect(caps[cap] ?? false).toBe(advertised);
  });

  test('topology keys are the one the driver reports', () => {
    expect(e2e.DriverInfo.TopologyKeys).toEqual([TOPOLOGY_NODE_KEY]);
  });

  test('supported fs types are the default and the ones the node can make', () => {
    expect(Object.keys(e2e.DriverInfo.SupportedFsType).sort()).toEqual(['', ...SUPPORTED_FS_TYPES].sort());
  });
});

// ------------------------------------------------------------------ docs

describe("the docs' driver commands", () => {
  const local = read(path.join(REPO_ROOT, 'docs/quickstart-local.md'));
  const shellLines = codeBlocks(local)
    .filter((b) => b.lang === 'sh')
    .flatMap((b) => b.body.split('\n'))
    .map((l) => l.trim())
    .filter(Boolean);
  const cliFlags = flagsOf(serveHelp());

  test('every flag the docs give `cbt-csi serve` / `npm start` is a flag it has', () => {
    const docsText = ['quickstart-local.md', 'quickstart-kind.md', 'troubleshooting.md', 'node-data-plane.md']
      .map((f) => read(path.join(REPO_ROOT, 'docs', f)))
      .join('\n');
    const commands = [...docsText.matchAll(/(?:npm start --|cbt-csi serve|dist\/src\/cli\.js serve)([^\n`]*)/g)].map(
      (m) => m[1]!,
    );
    expect(commands.length).toBeGreaterThan(2);
    const used = new Set(commands.flatMap((c) => [...flagsOf(c)]));
    expect([...used].filter((f) => !cliFlags.has(f) && f !== 'help')).toEqual([]);
  });

  test('`npm start -- --help` prints the serve options', () => {
    expect(shellLines).toContain('npm start -- --help');
    const r = spawnSync('npm', ['start', '--silent', '--', '--help'], { cwd: REPO_ROOT, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('Usage: cbt-csi serve');
  });

  test('the local quickstart runs: npm start on a socket, then the example client against it', async () => {
    const start = shellLines.find((l) => l.startsWith('npm start -- --endpoint'))!;
    const clientLine = shellLines.find((l) => l.includes('docs/examples/local-client.ts'))!;
    expect(start).toBeDefined();
    expect(clientLine).toBeDefined();
    // The docs use /tmp/cbt; a test uses its own directory in its place.
    const dir = tempDir();
    const argv = start.replaceAll('/tmp/cbt', dir).split(/\s+/);
    await startUntilListening(argv);
    const client = clientLine.replaceAll('/tmp/cbt', dir).split(/\s+/);
    expect(client[0]).toBe('node');
    const r = spawnSync(process.execPath, client.slice(1), { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^plugin cbt\.csi\.dev /m);
    expect(r.stdout).toContain('changed extents between the snapshots: 0');
    expect(r.stdout).toContain('cleaned up');
  });
});
