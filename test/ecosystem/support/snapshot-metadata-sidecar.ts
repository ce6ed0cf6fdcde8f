/**
 * The chart's csi-snapshot-metadata sidecar as a process beside a running driver, against the control
 * plane of control-plane.ts, as the chart deploys it:
 *
 * - the chart is rendered by helm (TLS mode `secret`, with a CA and serving certificate this file makes
 *   with openssl) and every object applied, the SnapshotMetadataService with its address remapped to
 *   the sidecar's loopback port, and the TLS Secret the chart names created from the same files;
 * - the sidecar runs with the container's own args from the render, only paths (the container's volume
 *   mounts) and ports remapped, plus --kubeconfig in place of the in-cluster config, holding a token of
 *   the ServiceAccount the chart's pod runs as, so the chart's RBAC is what the sidecar has.
 *
 * An arg this file does not know makes it throw: a chart change must be looked at here, not run blind.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parse as parseYaml, parseAllDocuments, stringify } from 'yaml';
import { REPO_ROOT } from '../../support/test-driver.js';
import { tool } from '../tools.js';
import type { ControlPlane } from './control-plane.js';

const CHART = path.join(REPO_ROOT, 'charts/cbt-csi');
const CONTAINER = 'csi-snapshot-metadata';
/** The Secret the chart is told to use in TLS mode `secret`. */
const TLS_SECRET = 'cbt-csi-snapshot-metadata-test-tls';

export type K8sObject = {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; [key: string]: unknown };
  [key: string]: unknown;
};

interface Container {
  name: string;
  args?: string[];
  volumeMounts?: { name: string; mountPath: string }[];
}
interface PodSpec {
  serviceAccountName: string;
  containers: Container[];
  volumes: { name: string; hostPath?: { path: string }; secret?: { secretName: string } }[];
}

export interface SidecarOptions {
  release: string;
  namespace: string;
  /** The directory of the driver's socket `csi.sock` (the pod's socket-dir volume). */
  socketDir: string;
  /** ServiceAccounts the chart binds to its backup-client role (backupClientRole.serviceAccounts). */
  backupClients: { namespace: string; name: string }[];
}

export interface SnapshotMetadataSidecar {
  /** Where clients dial it: the SnapshotMetadataService's spec.address. */
  address: string;
  /** The CA that signed its serving certificate (PEM): the SnapshotMetadataService's caCert. */
  caPem: string;
  /** The audience the chart configured (--audience and the SnapshotMetadataService's). */
  audience: string;
  driverName: string;
  /** The container's args as the chart renders them, and as this process runs them. */
  chartArgs: string[];
  args: string[];
  /** Every object of the render, as applied. */
  objects: K8sObject[];
  /** The sidecar's output so far (klog). */
  log(): string;
  /** Kills the process (no cleanup on its side with SIGKILL). */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Starts it again with the same args and ports, and waits until it is ready. */
  restart(): Promise<void>;
  /** Stops it and removes its files. */
  stop(): Promise<void>;
}

/** A TCP port free on 127.0.0.1 right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

function openssl(args: string[], cwd: string): void {
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr || r.error?.message}`);
}

/**
 * A CA and a serving certificate signed by it, for `dnsNames` and 127.0.0.1 (where the test dials):
 * ca.crt, tls.crt, tls.key in `dir`.
 */
export function makeCertificates(dir: string, dnsNames: string[]): { ca: string; crt: string; key: string } {
  fs.writeFileSync(
    path.join(dir, 'ca.cnf'),
    [
      '[req]',
      'distinguished_name = dn',
      'prompt = no',
      'x509_extensions = ca',
      '[dn]',
      'CN = cbt-csi test CA',
      '[ca]',
      'basicConstraints = critical,CA:TRUE',
      'keyUsage = critical,keyCertSign,cRLSign',
      'subjectKeyIdentifier = hash',
      '',
    ].join('\n'),
  );
  fs.writeFileSync(
    path.join(dir, 'server.cnf'),
    [
      '[req]',
      'distinguished_name = dn',
      'prompt = no',
      '[dn]',
      `CN = ${dnsNames[0]}`,
      '[server]',
      'basicConstraints = critical,CA:FALSE',
      'keyUsage = critical,digitalSignature',
      'extendedKeyUsage = serverAuth',
      `subjectAltName = ${[...dnsNames.map((n) => `DNS:${n}`), 'IP:127.0.0.1'].join(',')}`,
      'authorityKeyIdentifier = keyid',
      '',
    ].join('\n'),
  );
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(
    ['req', '-x509', '-new', '-config', 'ca.cnf', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2'],
    dir,
  );
  openssl(['req', '-new', '-config', 'server.cnf', ...ec, '-keyout', 'tls.key', '-out', 'tls.csr'], dir);
  openssl(
    [
      'x509',
      '-req',
      '-in',
      'tls.csr',
      '-CA',
      'ca.crt',
      '-CAkey',
      'ca.key',
      '-set_serial',
      `0x${randomBytes(8).toString('hex')}`,
      '-days',
      '2',
      '-extfile',
      'server.cnf',
      '-extensions',
      'server',
      '-out',
      'tls.crt',
    ],
    dir,
  );
  const read = (f: string) => fs.readFileSync(path.join(dir, f), 'utf8');
  return { ca: read('ca.crt'), crt: read('tls.crt'), key: read('tls.key') };
}

/** Objects as one multi-document YAML stream, for kubectl. */
export const toYaml = (objects: object[]) => objects.map((o) => stringify(o)).join('---\n');

/** `helm template` of the chart, as objects. */
export function renderChart(dir: string, release: string, namespace: string, values: object): K8sObject[] {
  const valuesFile = path.join(dir, 'values.json');
  fs.writeFileSync(valuesFile, JSON.stringify(values));
  const r = spawnSync(tool('helm'), ['template', release, CHART, '--namespace', namespace, '-f', valuesFile], {
    encoding: 'utf8',
    env: {
      ...process.env,
      HELM_CACHE_HOME: path.join(dir, 'helm'),
      HELM_CONFIG_HOME: path.join(dir, 'helm'),
      HELM_DATA_HOME: path.join(dir, 'helm'),
    },
  });
  if (r.status !== 0) throw new Error(`helm template: ${r.stderr}`);
  return parseAllDocuments(r.stdout)
    .map((d) => d.toJS() as K8sObject | null)
    .filter((o): o is K8sObject => o !== null);
}

/** A kubeconfig for the control plane's API server that authenticates with `token`. */
export function kubeconfigWithToken(cp: ControlPlane, token: string, file: string): string {
  const admin = parseYaml(fs.readFileSync(cp.kubeconfig, 'utf8')) as {
    clusters: { cluster: { server: string; 'certificate-authority': string } }[];
  };
  const cluster = admin.clusters[0]!.cluster;
  fs.writeFileSync(
    file,
    stringify({
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'test', cluster }],
      users: [{ name: 'user', user: { token } }],
      contexts: [{ name: 'test', context: { cluster: 'test', user: 'user' } }],
      'current-context': 'test',
    }),
    { mode: 0o600 },
  );
  return file;
}

/** A token of a ServiceAccount for the API server (its default audience), as kubelet mounts one. */
export function serviceAccountToken(cp: ControlPlane, namespace: string, name: string, audience?: string): string {
  const args = ['create', 'token', name, '-n', namespace, '--duration=2h'];
  if (audience) args.push(`--audience=${audience}`);
  return cp.kubectl(args).stdout.trim();
}

/** Maps each of the chart's args to this machine; throws on an arg it does not know. */
function remapArgs(chartArgs: string[], mounts: Map<string, string>, ports: { grpc: number; http: number }): string[] {
  const remapPath = (value: string) => {
    for (const [mountPath, local] of mounts)
      if (value === mountPath || value.startsWith(`${mountPath}/`)) return local + value.slice(mountPath.length);
    throw new Error(`${value} is under none of the container's volume mounts`);
  };
  return chartArgs.map((arg) => {
    const m = /^--([a-z-]+)=(.*)$/.exec(arg);
    if (!m) throw new Error(`chart arg ${arg} of ${CONTAINER} is not --flag=value`);
    const [, flag, value] = m as unknown as [string, string, string];
    switch (flag) {
      case 'csi-address':
      case 'tls-cert':
      case 'tls-key':
        return `--${flag}=${remapPath(value)}`;
      case 'port':
        return `--port=${ports.grpc}`;
      case 'http-endpoint':
        // The chart listens on every address in the pod; here only on loopback.
        return `--http-endpoint=127.0.0.1:${ports.http}`;
      case 'audience':
      case 'max-streaming-duration-min':
        return arg;
      default:
        throw new Error(`the chart passes ${arg} to ${CONTAINER}: teach snapshot-metadata-sidecar.ts how to run it`);
    }
  });
}

/** Whether the sidecar on 127.0.0.1:`port` answers /health with 200. */
export async function healthy(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/health', timeout: 2000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on('error', () => resolve(false));
    req.on('timeout', () => {
      req.destroy();
      resolve(false);
    });
  });
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Renders and applies the chart, and starts its csi-snapshot-metadata container's program beside the
 * driver whose socket is `socketDir/csi.sock`. The CRDs and the namespaces must exist.
 */
export async function startSnapshotMetadataSidecar(
  cp: ControlPlane,
  options: SidecarOptions,
): Promise<SnapshotMetadataSidecar> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-sidecar-'));
  let child: ChildProcess | undefined;
  let log = '';
  const stopChild = async (signal: NodeJS.Signals) => {
    const c = child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => c.once('exit', () => resolve()));
    c.kill(signal);
    const timer = setTimeout(() => c.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  };
  try {
    // The certificate covers the Service names the chart gives the sidecar (what a client in the
    // cluster dials) and 127.0.0.1 (what this test dials).
    const service = `${options.release}-snapshot-metadata`;
    const ns = options.namespace;
    const tlsDir = path.join(dir, 'tls');
    fs.mkdirSync(tlsDir);
    const certs = makeCertificates(tlsDir, [
      service,
      `${service}.${ns}`,
      `${service}.${ns}.svc`,
      `${service}.${ns}.svc.cluster.local`,
    ]);
    const objects = renderChart(dir, options.release, ns, {
      snapshotMetadata: { tls: { mode: 'secret', existingSecret: TLS_SECRET, caBundle: certs.ca } },
      backupClientRole: { serviceAccounts: options.backupClients },
    });

    const workload = objects.find((o) => o.kind === 'StatefulSet' || o.kind === 'DaemonSet');
    if (!workload) throw new Error('the chart rendered no StatefulSet or DaemonSet');
    const pod = (workload.spec as { template: { spec: PodSpec } }).template.spec;
    const container = pod.containers.find((c) => c.name === CONTAINER);
    if (!container) throw new Error(`the chart's pod has no ${CONTAINER} container`);
    const chartArgs = container.args ?? [];

    // The container's volume mounts, as directories here: the driver's socket dir and the TLS Secret's files.
    const secretFiles = { 'tls.crt': certs.crt, 'tls.key': certs.key, 'ca.crt': certs.ca };
    const mounts = new Map<string, string>();
    for (const mount of container.volumeMounts ?? []) {
      const volume = pod.volumes.find((v) => v.name === mount.name);
      if (volume?.hostPath) mounts.set(mount.mountPath, options.socketDir);
      else if (volume?.secret?.secretName === TLS_SECRET) {
        const secretDir = path.join(dir, 'secret');
        fs.mkdirSync(secretDir, { mode: 0o700 });
        for (const [file, data] of Object.entries(secretFiles))
          fs.writeFileSync(path.join(secretDir, file), data, { mode: 0o600 });
        mounts.set(mount.mountPath, secretDir);
      } else throw new Error(`volume ${mount.name} of ${CONTAINER}: not a hostPath or the TLS Secret`);
    }
    const ports = { grpc: await freePort(), http: await freePort() };
    const address = `127.0.0.1:${ports.grpc}`;

    // Apply as the chart would, with the service's address remapped to where this sidecar listens.
    const sms = objects.find((o) => o.kind === 'SnapshotMetadataService');
    if (!sms) throw new Error('the chart rendered no SnapshotMetadataService');
    const smsSpec = sms.spec as { address: string; caCert: string; audience: string };
    smsSpec.address = address;
    const secret: K8sObject = {
      apiVersion: 'v1',
      kind: 'Secret',
      type: 'kubernetes.io/tls',
      metadata: { name: TLS_SECRET, namespace: ns },
      stringData: secretFiles,
    };
    cp.kubectl(['apply', '-f', '-'], { input: toYaml([secret, ...objects]) });

    const token = serviceAccountToken(cp, ns, pod.serviceAccountName);
    const kubeconfig = kubeconfigWithToken(cp, token, path.join(dir, 'kubeconfig'));
    const args = [...remapArgs(chartArgs, mounts, ports), `--kubeconfig=${kubeconfig}`];

    const start = async () => {
      const c = spawn(tool('csi-snapshot-metadata'), args, { stdio: ['ignore', 'pipe', 'pipe'] });
      child = c;
      c.stdout!.on('data', (d: Buffer) => (log += d.toString()));
      c.stderr!.on('data', (d: Buffer) => (log += d.toString()));
      const deadline = Date.now() + 60_000;
      while (!(await healthy(ports.http))) {
        if (c.exitCode !== null || c.signalCode !== null)
          throw new Error(`${CONTAINER} exited (${c.exitCode ?? c.signalCode}):\n${log.slice(-4000)}`);
        if (Date.now() > deadline) throw new Error(`${CONTAINER} not healthy after 60 s:\n${log.slice(-4000)}`);
        await sleep(200);
      }
    };
    await start();

    return {
      address,
      caPem: Buffer.from(smsSpec.caCert, 'base64').toString(),
      audience: smsSpec.audience,
      driverName: sms.metadata.name,
      chartArgs,
      args,
      objects,
      log: () => log,
      kill: (signal = 'SIGKILL') => stopChild(signal),
      restart: start,
      async stop() {
        await stopChild('SIGTERM');
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await stopChild('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}
