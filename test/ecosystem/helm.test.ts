/**
 * The chart through the real helm (the pinned build): `helm lint` and `helm template` over a matrix of
 * values, each render checked for what the chart promises (one audience, no cluster-wide token
 * creation), then validated by a real kube-apiserver (`kubectl apply --dry-run=server`, CRDs installed
 * first), where the chart's RBAC is also asked, per sidecar, with SubjectAccessReviews.
 */
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parse as parseYaml, parseAllDocuments, stringify } from 'yaml';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { parseFaultRules } from '../../src/vendor/fault-rules.js';
import { runCli } from '../backup/support/cli.js';
import { REPO_ROOT, spawnDriver } from '../support/test-driver.js';
import { SIDECAR_NEEDS } from '../packaging/sidecar-needs.js';
import { crdFiles, startControlPlane, type ControlPlane } from './support/control-plane.js';
import { COMPONENTS, missingTools, suiteUnless, tool } from './tools.js';

const CHART = path.join(REPO_ROOT, 'charts/cbt-csi');
const RELEASE = 'cbt-csi';
const NAMESPACE = 'cbt-system';
const CLIENT = { namespace: 'backup', name: 'backup-app' };

type Obj = { apiVersion: string; kind: string; metadata: { name: string; namespace?: string }; [key: string]: unknown };
type Values = Record<string, unknown>;

/** A CA certificate in PEM for the TLS modes that take one from the user (any PEM the API server stores). */
let caPem = '';

/** Fault rules as a vendor writes them in values (driver.faults): the driver must start with them in force. */
const FAULT_RULES = [
  { rpc: 'GetMetadataDelta', action: 'fail-after', afterMessages: 2, code: 'UNAVAILABLE', times: 1 },
  { rpc: 'GetMetadataAllocated', action: 'delay', delayMs: 50, snapshot: 'snap-1' },
];

/** The values matrix: every mode and TLS mode the chart has, and the driver settings that change its args. */
const MATRIX: [string, () => Values][] = [
  ['default (mode single, TLS by helm)', () => ({})],
  ['mode daemonset', () => ({ mode: 'daemonset' })],
  [
    'mode daemonset, peer TLS from an existing Secret',
    () => ({ mode: 'daemonset', peer: { tls: { mode: 'secret', existingSecret: 'cbt-peer-tls' } } }),
  ],
  [
    'a custom audience and backup-client ServiceAccounts',
    () => ({
      snapshotMetadata: { audience: 'backup.example.com/cbt' },
      backupClientRole: { serviceAccounts: [CLIENT, { namespace: 'other', name: 'reader' }] },
    }),
  ],
  [
    'TLS by cert-manager',
    () => ({
      snapshotMetadata: {
        tls: { mode: 'certManager', caBundle: caPem, certManager: { issuerRef: { name: 'cbt-ca' } } },
      },
    }),
  ],
  [
    'TLS from an existing Secret',
    () => ({
      snapshotMetadata: { tls: { mode: 'secret', existingSecret: 'cbt-snapshot-metadata-tls', caBundle: caPem } },
    }),
  ],
  [
    'FIXED metadata',
    () => ({ driver: { metadataStyle: 'FIXED' }, storageClass: { parameters: { metadataStyle: 'FIXED' } } }),
  ],
  [
    'a custom block size',
    () => ({ driver: { defaultBlockSize: '64Ki' }, storageClass: { parameters: { blockSize: '64Ki' } } }),
  ],
  [
    'a VolumeAttributesClass, and I/O limits in the StorageClass',
    () => ({
      volumeAttributesClass: { create: true, parameters: { maxIops: '500', metadataStyle: 'FIXED' } },
      storageClass: { parameters: { maxBandwidth: '256Mi' } },
    }),
  ],
  [
    'vendor bench: an admin endpoint and fault rules from the start',
    () => ({ driver: { adminEndpoint: '/csi/admin.sock', faults: FAULT_RULES } }),
  ],
  [
    'group snapshots and deleted-snapshot retention',
    () => ({
      volumeGroupSnapshotClass: { create: true },
      driver: { deletedSnapshotRetentionDays: 7, deletedSnapshotMaxPerVolume: 32 },
    }),
  ],
];

let dir = '';

/** Objects as one multi-document YAML stream, for kubectl. */
const toYaml = (objects: object[]) => objects.map((o) => stringify(o)).join('---\n');

function helm(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(tool('helm'), args, {
    encoding: 'utf8',
    env: {
      ...process.env,
      HELM_CACHE_HOME: path.join(dir, 'helm-cache'),
      HELM_CONFIG_HOME: path.join(dir, 'helm-config'),
      HELM_DATA_HOME: path.join(dir, 'helm-data'),
    },
  });
  return { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? r.error?.message ?? '' };
}

function valuesFile(name: string, values: Values): string {
  const file = path.join(dir, `${name.replace(/\W+/g, '-')}.json`);
  fs.writeFileSync(file, JSON.stringify(values));
  return file;
}

/** `helm template` of the chart with these values, as objects; also written to a file for kubectl. */
function render(name: string, values: Values): { file: string; objects: Obj[] } {
  const r = helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, '-f', valuesFile(name, values)]);
  expect(r.status, r.stderr).toBe(0);
  const file = path.join(dir, `${name.replace(/\W+/g, '-')}.yaml`);
  fs.writeFileSync(file, r.stdout);
  const objects = parseAllDocuments(r.stdout)
    .map((d) => {
      expect(d.errors).toEqual([]);
      return d.toJS() as Obj | null;
    })
    .filter((o): o is Obj => o !== null);
  return { file, objects };
}

const containers = (objects: Obj[]) =>
  objects
    .filter((o) => o.kind === 'StatefulSet' || o.kind === 'DaemonSet')
    .flatMap(
      (o) =>
        (o.spec as { template: { spec: { containers: { name: string; args?: string[] }[] } } }).template.spec
          .containers,
    );

interface Rule {
  apiGroups: string[];
  resources: string[];
  verbs: string[];
  resourceNames?: string[];
}
const grantsTokenCreate = (rule: Rule) =>
  (rule.apiGroups.includes('') || rule.apiGroups.includes('*')) &&
  (rule.resources.includes('serviceaccounts/token') ||
    rule.resources.includes('*') ||
    rule.resources.includes('serviceaccounts/*')) &&
  (rule.verbs.includes('create') || rule.verbs.includes('*'));

suiteUnless(missingTools(['helm']), `helm ${COMPONENTS.helm!.version}: lint and template`, () => {
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-helm-'));
    // The CA the chart generates in mode helm serves as the user's CA of the other TLS modes.
    const secret = render('ca-source', {}).objects.find((o) => o.kind === 'Secret')!;
    caPem = Buffer.from((secret.data as Record<string, string>)['ca.crt']!, 'base64').toString();
    expect(caPem).toMatch(/^-----BEGIN CERTIFICATE-----/);
  });
  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test.each(MATRIX)('helm lint --strict passes: %s', (name, values) => {
    const r = helm(['lint', '--strict', CHART, '--namespace', NAMESPACE, '-f', valuesFile(name, values())]);
    expect(r.status, r.stdout + r.stderr).toBe(0);
  });

  test.each(MATRIX)("helm template renders objects that keep the chart's promises: %s", (name, values) => {
    const v = values();
    const { objects } = render(name, v);
    expect(objects.length).toBeGreaterThan(5);
    for (const o of objects) expect(typeof o.metadata?.name, `${o.kind} without a name`).toBe('string');
    // One audience: the SnapshotMetadataService's and the sidecar's.
    const sms = objects.find((o) => o.kind === 'SnapshotMetadataService');
    const sidecar = containers(objects).find((c) => c.name === 'csi-snapshot-metadata');
    expect(Boolean(sms)).toBe(Boolean(sidecar));
    if (sms && sidecar) {
      const audience = (sms.spec as { audience: string }).audience;
      expect(sidecar.args).toContain(`--audience=${audience}`);
      const wanted =
        ((v.snapshotMetadata as Values | undefined)?.audience as string | undefined) ?? 'cbt-csi-snapshot-metadata';
      expect(audience).toBe(wanted);
    }
    // The VolumeAttributesClass is this driver's, and the sidecars that act on one are told to (only then).
    const vac = objects.find((o) => o.kind === 'VolumeAttributesClass');
    const wantsVac = Boolean((v.volumeAttributesClass as Values | undefined)?.create);
    expect(Boolean(vac)).toBe(wantsVac);
    if (vac) expect(vac.driverName).toBe('cbt.csi.dev');
    for (const name of ['csi-provisioner', 'csi-resizer']) {
      const c = containers(objects).find((x) => x.name === name);
      if (c) expect(c.args?.includes('--feature-gates=VolumeAttributesClass=true'), name).toBe(wantsVac);
    }
    // No cluster-wide token creation; token creation only for a client itself, in its namespace.
    const clusterRoles = objects.filter((o) => o.kind === 'ClusterRole');
    expect(clusterRoles.filter((r) => (r.rules as Rule[]).some(grantsTokenCreate)).map((r) => r.metadata.name)).toEqual(
      [],
    );
    for (const role of objects.filter((o) => o.kind === 'Role' && (o.rules as Rule[]).some(grantsTokenCreate))) {
      const binding = objects.find(
        (o) => o.kind === 'RoleBinding' && (o.roleRef as { name: string }).name === role.metadata.name,
      )!;
      const subjects = binding.subjects as { name: string; namespace: string }[];
      expect(subjects).toHaveLength(1);
      expect(subjects[0]!.namespace).toBe(role.metadata.namespace);
      for (const rule of (role.rules as Rule[]).filter(grantsTokenCreate))
        expect(rule.resourceNames).toEqual([subjects[0]!.name]);
    }
  });
});

/** The SnapshotMetadataService's spec as the chart renders it with these values. */
function smsSpec(values: Values): Record<string, unknown> {
  const sms = render('sms', values).objects.find((o) => o.kind === 'SnapshotMetadataService')!;
  return sms.spec as Record<string, unknown>;
}

suiteUnless(missingTools(['helm']), `helm ${COMPONENTS.helm!.version}: requireBaseSnapshotForDelta`, () => {
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-helm-'));
  });
  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('left out by default; written as the boolean asked for', () => {
    expect(smsSpec({})).not.toHaveProperty('requireBaseSnapshotForDelta');
    expect(smsSpec({ snapshotMetadata: { requireBaseSnapshotForDelta: null } })).not.toHaveProperty(
      'requireBaseSnapshotForDelta',
    );
    expect(smsSpec({ snapshotMetadata: { requireBaseSnapshotForDelta: false } }).requireBaseSnapshotForDelta).toBe(
      false,
    );
    expect(smsSpec({ snapshotMetadata: { requireBaseSnapshotForDelta: true } }).requireBaseSnapshotForDelta).toBe(true);
  });

  test.each([
    [
      'driver.metadataProfile ceph-rbd',
      { driver: { metadataProfile: 'ceph-rbd' } },
      /metadataProfile hostpath or ceph-rbd/,
    ],
    [
      "the StorageClass's metadataProfile hostpath",
      { storageClass: { parameters: { metadataProfile: 'hostpath' } } },
      /metadataProfile hostpath or ceph-rbd/,
    ],
    ['no records kept', { driver: { deletedSnapshotMaxPerVolume: 0 } }, /deletedSnapshotMaxPerVolume or/],
    [
      'records that expire at once',
      { driver: { deletedSnapshotRetentionDays: 0 } },
      /deletedSnapshotRetentionDays is 0/,
    ],
  ])('false is refused with %s, where it would not hold', (_name, extra, message) => {
    const values = { ...extra, snapshotMetadata: { requireBaseSnapshotForDelta: false } };
    const r = helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, '-f', valuesFile('refused', values)]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(message);
  });

  test('the schema refuses a string', () => {
    const values = { snapshotMetadata: { requireBaseSnapshotForDelta: 'false' } };
    const r = helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, '-f', valuesFile('string', values)]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/requireBaseSnapshotForDelta/);
  });
});

suiteUnless(missingTools(['helm']), `helm ${COMPONENTS.helm!.version}: fault rules at start-up (driver.faults)`, () => {
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-helm-'));
  });
  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  type Pod = {
    metadata: { annotations?: Record<string, string> };
    spec: {
      containers: { name: string; args?: string[]; volumeMounts?: { name: string; mountPath: string }[] }[];
      volumes: { name: string; configMap?: { name: string } }[];
    };
  };
  const podOf = (objects: Obj[]) =>
    (objects.find((o) => o.kind === 'StatefulSet' || o.kind === 'DaemonSet')!.spec as { template: Pod }).template;
  /** The file --faults names, as the container sees it: the ConfigMap key under the volume's mount. */
  const faultsFileOf = (objects: Obj[]) => {
    const pod = podOf(objects);
    const driver = pod.spec.containers.find((c) => c.name === 'cbt-csi')!;
    const arg = driver.args!.find((a) => a.startsWith('--faults='));
    if (!arg) return undefined;
    const file = arg.slice('--faults='.length);
    const mount = driver.volumeMounts!.find((m) => file.startsWith(`${m.mountPath}/`))!;
    const volume = pod.spec.volumes.find((v) => v.name === mount.name)!;
    const configMap = objects.find((o) => o.kind === 'ConfigMap' && o.metadata.name === volume.configMap?.name)!;
    return (configMap.data as Record<string, string>)[file.slice(mount.mountPath.length + 1)];
  };

  test('no rules (the default): no ConfigMap, no --faults, no faults volume', () => {
    const { objects } = render('no-faults', {});
    expect(objects.filter((o) => o.kind === 'ConfigMap')).toEqual([]);
    expect(faultsFileOf(objects)).toBeUndefined();
    expect(podOf(objects).spec.volumes.map((v) => v.name)).not.toContain('faults');
    expect(podOf(objects).metadata.annotations?.['checksum/faults']).toBeUndefined();
  });

  test.each(['single', 'daemonset'])(
    'mode %s: the rules are in a ConfigMap mounted where --faults points, and parse to the same rules',
    (mode) => {
      const { objects } = render(`faults-${mode}`, { mode, driver: { faults: FAULT_RULES } });
      const text = faultsFileOf(objects);
      expect(text).toBeDefined();
      expect(parseFaultRules(parseYaml(text!))).toEqual(FAULT_RULES);
    },
  );

  test('changed rules change the pod template (a checksum annotation), so the driver restarts with them', () => {
    const a = podOf(render('faults-a', { driver: { faults: FAULT_RULES } }).objects);
    const b = podOf(render('faults-b', { driver: { faults: FAULT_RULES.slice(0, 1) } }).objects);
    expect(a.metadata.annotations!['checksum/faults']).toMatch(/^[0-9a-f]{64}$/);
    expect(b.metadata.annotations!['checksum/faults']).not.toBe(a.metadata.annotations!['checksum/faults']);
  });

  test('a rule with an unknown rpc or action is refused by the schema, naming the field', () => {
    for (const [rule, field] of [
      [{ rpc: 'GetMetadata', action: 'fail' }, 'rpc'],
      [{ rpc: 'GetMetadataDelta', action: 'explode' }, 'action'],
      [{ action: 'fail' }, 'rpc'],
    ] as const) {
      const r = helm([
        ...['template', RELEASE, CHART, '--namespace', NAMESPACE],
        ...['-f', valuesFile(`bad-${field}`, { driver: { faults: [rule] } })],
      ]);
      expect(r.status, JSON.stringify(rule)).not.toBe(0);
      expect(r.stderr).toMatch(new RegExp(`/driver/faults/0\\b.*\\b${field}\\b`));
    }
  });

  test('the driver started with the rendered file has the rules in force (cbt-csi faults list)', async () => {
    const { objects } = render('faults-run', { driver: { faults: FAULT_RULES } });
    const file = path.join(dir, 'faults.yaml');
    fs.writeFileSync(file, faultsFileOf(objects)!);
    const admin = path.join(dir, 'admin.sock');
    const driver = await spawnDriver([
      ...['--endpoint', `unix://${path.join(dir, 'csi.sock')}`, '--state-dir', path.join(dir, 'state')],
      ...['--node-id', 'n', '--log-level', 'warn', '--faults', file, '--admin-endpoint', admin],
    ]);
    try {
      const listed = await runCli(['faults', 'list', '--admin-endpoint', admin, '--json']);
      expect(listed.code, listed.stderr).toBe(0);
      expect(JSON.parse(listed.stdout)).toMatchObject(FAULT_RULES.map((rule) => ({ ...rule, fired: 0 })));
    } finally {
      driver.child.kill('SIGTERM');
      await new Promise((resolve) => driver.child.once('exit', resolve));
    }
  }, 60_000);
});

suiteUnless(missingTools(['helm']), `helm ${COMPONENTS.helm!.version}: mode daemonset (multi-node)`, () => {
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-helm-'));
  });
  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  type Container = { name: string; args?: string[]; env?: { name: string }[]; ports?: { containerPort: number }[] };
  const daemonSetOf = (objects: Obj[]) => {
    const ds = objects.find((o) => o.kind === 'DaemonSet')!;
    const template = (
      ds.spec as {
        template: {
          metadata: { labels: Record<string, string> };
          spec: { containers: Container[]; volumes: { name: string; secret?: { secretName: string } }[] };
        };
      }
    ).template;
    return { template, container: (name: string) => template.spec.containers.find((c) => c.name === name) };
  };

  test('every plugin pod has the driver with a mutual-TLS peer listener, csi-snapshot-metadata, and a leader-elected csi-resizer', () => {
    const { objects } = render('daemonset-peers', { mode: 'daemonset' });
    const { template, container } = daemonSetOf(objects);
    const driver = container('cbt-csi')!;
    const labels = template.metadata.labels;
    const selector = Object.entries(labels)
      .filter(([k]) => k.startsWith('app.kubernetes.io/'))
      .map(([k, v]) => `${k}=${v}`)
      .sort();
    const arg = (name: string) => driver.args!.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
    expect(arg('peer-listen')).toBe('$(POD_IP):9820');
    expect(arg('peer-discovery')).toBe('kubernetes');
    expect(arg('peer-pod-selector')!.split(',').sort()).toEqual(selector);
    expect(arg('peer-namespace')).toBe('$(POD_NAMESPACE)');
    for (const f of ['peer-tls-cert', 'peer-tls-key', 'peer-tls-ca'])
      expect(arg(f)).toMatch(/^\/etc\/cbt-csi\/peer-tls\//);
    expect(driver.env!.map((e) => e.name)).toEqual(expect.arrayContaining(['NODE_NAME', 'POD_IP', 'POD_NAMESPACE']));
    expect(driver.ports!.map((p) => p.containerPort)).toContain(9820);
    expect(container('csi-resizer')!.args).toEqual(expect.arrayContaining(['--leader-election']));
    expect(container('csi-snapshot-metadata')).toBeDefined();
    // One Service for the cluster's snapshot metadata, over every plugin pod; none exposes the peer port.
    const services = objects.filter((o) => o.kind === 'Service');
    expect(services).toHaveLength(1);
    const service = services[0]!.spec as {
      selector: Record<string, string>;
      ports: { port: number; targetPort: unknown }[];
    };
    for (const [k, v] of Object.entries(service.selector)) expect(labels[k]).toBe(v);
    expect(service.ports.map((p) => p.targetPort)).toEqual(['snapshot-meta']);
    // The peer certificate: from the chart's CA, naming cbt-csi-peer, for server and client use.
    const volume = template.spec.volumes.find((v) => v.name === 'peer-tls')!;
    const secret = objects.find((o) => o.kind === 'Secret' && o.metadata.name === volume.secret!.secretName)!;
    const pem = (key: string) => Buffer.from((secret.data as Record<string, string>)[key]!, 'base64').toString();
    const cert = new X509Certificate(pem('tls.crt'));
    const ca = new X509Certificate(pem('ca.crt'));
    expect(cert.checkHost('cbt-csi-peer')).toBe('cbt-csi-peer');
    expect(cert.verify(ca.publicKey)).toBe(true);
    expect(cert.keyUsage).toEqual(expect.arrayContaining(['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2']));
    // The driver may list the pods of its namespace, nothing more.
    const role = objects.find((o) => o.kind === 'Role' && o.metadata.name === `${RELEASE}-driver`)!;
    expect(role.rules).toEqual([{ apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] }]);
  });

  test('mode single has no peer listener, no peer Secret and no driver Role', () => {
    const { objects } = render('single-no-peers', {});
    const ss = objects.find((o) => o.kind === 'StatefulSet')!;
    const containers = (ss.spec as { template: { spec: { containers: Container[] } } }).template.spec.containers;
    const driver = containers.find((c) => c.name === 'cbt-csi')!;
    expect(driver.args!.filter((a) => a.startsWith('--peer'))).toEqual([]);
    expect(objects.filter((o) => o.metadata.name.endsWith('-peer-tls') || o.metadata.name.endsWith('-driver'))).toEqual(
      [],
    );
    expect(containers.find((c) => c.name === 'csi-resizer')!.args).not.toContain('--leader-election');
  });

  test('peer TLS from an existing Secret mounts that Secret and generates none', () => {
    const { objects } = render('daemonset-peer-secret', {
      mode: 'daemonset',
      peer: { tls: { mode: 'secret', existingSecret: 'cbt-peer-tls' } },
    });
    const { template } = daemonSetOf(objects);
    expect(template.spec.volumes.find((v) => v.name === 'peer-tls')!.secret!.secretName).toBe('cbt-peer-tls');
    expect(objects.filter((o) => o.kind === 'Secret' && o.metadata.name.endsWith('-peer-tls'))).toEqual([]);
  });
});

suiteUnless(
  missingTools(['helm', 'etcd', 'kube-apiserver', 'kubectl']),
  `chart renders validated by kube-apiserver ${COMPONENTS.kubernetes!.version}`,
  () => {
    let cp: ControlPlane;

    beforeAll(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-helm-'));
      const secret = render('ca-source', {}).objects.find((o) => o.kind === 'Secret')!;
      caPem = Buffer.from((secret.data as Record<string, string>)['ca.crt']!, 'base64').toString();
      cp = await startControlPlane();
      for (const file of crdFiles()) cp.kubectl(['apply', '--server-side', '-f', file]);
      cp.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd', '--all']);
      for (const ns of [NAMESPACE, CLIENT.namespace, 'other']) cp.kubectl(['create', 'namespace', ns]);
    }, 240_000);
    afterAll(async () => {
      await cp?.stop();
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    });

    test.each(MATRIX)('kubectl apply --dry-run=server accepts every object: %s', (name, values) => {
      const { file, objects } = render(name, values());
      // cert-manager's Certificate has no CRD here (cert-manager is not part of this cluster): it is the
      // one object left to the client-side checks above.
      const kept = objects.filter((o) => o.apiVersion !== 'cert-manager.io/v1');
      expect(objects.length - kept.length).toBe(name.includes('cert-manager') ? 1 : 0);
      const input = toYaml(kept);
      const r = cp.kubectl(['apply', '--dry-run=server', '-f', '-'], { input, allowFail: true });
      expect(r.status, `${r.stderr}\n(render: ${file})`).toBe(0);
      expect(r.stdout.trim().split('\n')).toHaveLength(kept.length);
    });

    test('requireBaseSnapshotForDelta: the v1.1.0 CRD refuses the field (so the chart leaves it out by default); a CRD with the field accepts it', () => {
      const crdFile = crdFiles().find((f) => f.includes('snapshotmetadataservices'))!;
      type Schema = { type?: string; properties?: Record<string, Schema> };
      const crd = parseAllDocuments(fs.readFileSync(crdFile, 'utf8'))[0]!.toJS() as {
        spec: { versions: { name: string; schema: { openAPIV3Schema: Schema } }[] };
      };
      const sms = render('sms-false', { snapshotMetadata: { requireBaseSnapshotForDelta: false } }).objects.find(
        (o) => o.kind === 'SnapshotMetadataService',
      )!;
      const dryRun = () =>
        cp.kubectl(['apply', '--dry-run=server', '-f', '-'], { input: toYaml([sms]), allowFail: true });
      const refused = dryRun();
      expect(refused.status, refused.stdout).not.toBe(0);
      expect(refused.stderr).toMatch(/unknown field "spec\.requireBaseSnapshotForDelta"/);
      // The field as external-snapshot-metadata added it after v1.1.0: an optional boolean in spec.
      const spec = crd.spec.versions.find((v) => v.name === 'v1beta1')!.schema.openAPIV3Schema.properties!.spec!;
      spec.properties!.requireBaseSnapshotForDelta = { type: 'boolean' };
      try {
        cp.kubectl(['apply', '--server-side', '--force-conflicts', '-f', '-'], { input: toYaml([crd]) });
        let accepted = dryRun();
        // The API server takes a moment to serve the new schema.
        for (let i = 0; i < 50 && accepted.status !== 0; i++) {
          spawnSync('sleep', ['0.2']);
          accepted = dryRun();
        }
        expect(accepted.status, accepted.stderr).toBe(0);
      } finally {
        cp.kubectl(['apply', '--server-side', '--force-conflicts', '-f', crdFile]);
      }
    });

    test("each sidecar's roles alone, applied for real, let the API server allow everything in its table", () => {
      // Mode daemonset renders every role: the sidecars' and the driver's own (peer discovery).
      const { objects } = render('rbac', { mode: 'daemonset', backupClientRole: { serviceAccounts: [CLIENT] } });
      const rbac = objects.filter((o) =>
        ['ServiceAccount', 'ClusterRole', 'Role', 'ClusterRoleBinding', 'RoleBinding'].includes(o.kind),
      );
      cp.kubectl(['apply', '-f', '-'], { input: toYaml(rbac) });
      // One ServiceAccount per sidecar, bound to that sidecar's roles only.
      const probes: Obj[] = [];
      for (const sidecar of Object.keys(SIDECAR_NEEDS)) {
        const role = `${RELEASE}-${sidecar}`;
        const subject = [{ kind: 'ServiceAccount', name: `probe-${sidecar}`, namespace: NAMESPACE }];
        probes.push({
          apiVersion: 'v1',
          kind: 'ServiceAccount',
          metadata: { name: `probe-${sidecar}`, namespace: NAMESPACE },
        });
        probes.push({
          apiVersion: 'rbac.authorization.k8s.io/v1',
          kind: 'ClusterRoleBinding',
          metadata: { name: `probe-${sidecar}` },
          roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: role },
          subjects: subject,
        });
        if (rbac.some((o) => o.kind === 'Role' && o.metadata.name === role)) {
          probes.push({
            apiVersion: 'rbac.authorization.k8s.io/v1',
            kind: 'RoleBinding',
            metadata: { name: `probe-${sidecar}`, namespace: NAMESPACE },
            roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: role },
            subjects: subject,
          });
        }
      }
      cp.kubectl(['apply', '-f', '-'], { input: toYaml(probes) });

      const questions: { label: string; expected: boolean; user: string; attrs: Record<string, string> }[] = [];
      const sa = (ns: string, name: string) => `system:serviceaccount:${ns}:${name}`;
      for (const [sidecar, { needs }] of Object.entries(SIDECAR_NEEDS)) {
        for (const n of needs) {
          const [resource, subresource] = n.resource.split('/');
          for (const verb of n.verbs) {
            questions.push({
              label: `${sidecar}: ${verb} ${n.group || 'core'}/${n.resource}`,
              expected: true,
              user: sa(NAMESPACE, `probe-${sidecar}`),
              attrs: {
                group: n.group,
                resource: resource!,
                ...(subresource ? { subresource } : {}),
                verb,
                ...(n.scope === 'namespace' ? { namespace: NAMESPACE } : {}),
              },
            });
          }
        }
      }
      const token = (ns: string, name: string) => ({
        group: '',
        resource: 'serviceaccounts',
        subresource: 'token',
        verb: 'create',
        namespace: ns,
        name,
      });
      questions.push(
        {
          label: 'backup client: a token for itself',
          expected: true,
          user: sa(CLIENT.namespace, CLIENT.name),
          attrs: token(CLIENT.namespace, CLIENT.name),
        },
        {
          label: "backup client: a token for the driver's ServiceAccount",
          expected: false,
          user: sa(CLIENT.namespace, CLIENT.name),
          attrs: token(NAMESPACE, RELEASE),
        },
        {
          label: 'backup client: a token for another ServiceAccount of its namespace',
          expected: false,
          user: sa(CLIENT.namespace, CLIENT.name),
          attrs: token(CLIENT.namespace, 'default'),
        },
        {
          label: 'backup client: get VolumeSnapshots anywhere',
          expected: true,
          user: sa(CLIENT.namespace, CLIENT.name),
          attrs: { group: 'snapshot.storage.k8s.io', resource: 'volumesnapshots', verb: 'get', namespace: 'other' },
        },
        {
          label: 'backup client: get the SnapshotMetadataService',
          expected: true,
          user: sa(CLIENT.namespace, CLIENT.name),
          attrs: { group: 'cbt.storage.k8s.io', resource: 'snapshotmetadataservices', verb: 'get' },
        },
        {
          label: 'backup client: delete VolumeSnapshots',
          expected: false,
          user: sa(CLIENT.namespace, CLIENT.name),
          attrs: {
            group: 'snapshot.storage.k8s.io',
            resource: 'volumesnapshots',
            verb: 'delete',
            namespace: CLIENT.namespace,
          },
        },
        {
          label: "the driver's ServiceAccount: a token for any ServiceAccount",
          expected: false,
          user: sa(NAMESPACE, RELEASE),
          attrs: token('kube-system', 'default'),
        },
      );
      const reviews = {
        apiVersion: 'v1',
        kind: 'List',
        items: questions.map((q) => ({
          apiVersion: 'authorization.k8s.io/v1',
          kind: 'SubjectAccessReview',
          spec: {
            user: q.user,
            groups: [
              'system:serviceaccounts',
              `system:serviceaccounts:${q.user.split(':')[2]}`,
              'system:authenticated',
            ],
            resourceAttributes: q.attrs,
          },
        })),
      };
      // One line per review, in order: whether the API server's RBAC authorizer allows it.
      const out = cp.kubectl(['create', '-f', '-', '-o', 'jsonpath={.status.allowed}{"\\n"}'], {
        input: JSON.stringify(reviews),
      }).stdout;
      const allowed = out
        .trim()
        .split('\n')
        .map((l) => l === 'true');
      expect(allowed).toHaveLength(questions.length);
      const wrong = questions
        .filter((q, i) => allowed[i] !== q.expected)
        .map((q) => `${q.label}: expected ${q.expected ? 'allowed' : 'denied'}`);
      expect(wrong).toEqual([]);
    });
  },
);
