/**
 * The chart's mode daemonset on three nodes of a headless Kubernetes cluster (support/headless-cluster.ts):
 * etcd and kube-apiserver, the chart installed by helm with mode daemonset, snapshot-controller with
 * --enable-distributed-snapshotting, and on each node its plugin pod as processes: `cbt-csi serve` (its own
 * state directory, node ID and pod IP) with csi-provisioner and csi-snapshotter (--node-deployment) and
 * csi-snapshot-metadata, all with the chart's args and ServiceAccount. One csi-resizer runs, leader-elected,
 * on the first node. The one SnapshotMetadataService address is the chart's Service, spread over the three
 * csi-snapshot-metadata sidecars by support/service-standin.ts (kube-proxy's part).
 *
 * Done by hand where a real cluster has a component this one lacks: kubelet (support/kubelet-standin.ts:
 * Node/CSINode from NodeGetInfo, stage and publish), kube-controller-manager (support/pv-controller-standin.ts,
 * and the plugin Pod objects the DaemonSet controller makes), kube-scheduler (this test picks each claim's
 * node and sets the volume.kubernetes.io/selected-node annotation, as the scheduler does for a
 * WaitForFirstConsumer claim), kube-proxy, and cluster DNS (the SnapshotMetadataService's address, the
 * Service's name, is pointed at the stand-in's loopback address; the sidecars' certificate covers both).
 *
 * The flow, in order: a claim on each node, written and snapshotted twice; then through the one service
 * address, for every node's snapshots, our Go client (list, verify; the upstream lister and verifier stand
 * for it, which the snapshot-metadata proxy does not serve) and our TypeScript client in Kubernetes mode get
 * exactly the blocks written, whichever node's sidecar the connection lands on. One node's driver killed:
 * its snapshots fail UNAVAILABLE naming it, the others still answer; restarted: all answer. An expansion
 * through the one resizer reaches the owning node's volume. Everything stops, leaving nothing behind.
 * Replay a run's data with CBT_E2E_SEED.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { connectKubernetes, RetriesExhaustedError, type Extent, type ExtentListing } from '../../src/client/index.js';
import { Controller } from '../../src/gen/csi/v1/csi_pb.js';
import { MiB, sh } from '../e2e/support/node-env.js';
import { ServiceClient } from '../support/csi-client.js';
import { mulberry32 } from '../support/random.js';
import {
  missingForHeadlessCluster,
  startHeadlessCluster,
  whatRan,
  type ChartSidecar,
  type HeadlessCluster,
  type PluginPod,
} from './support/headless-cluster.js';
import type { KubeObject } from './support/kube-api.js';
import { KubeletStandIn, type PublishedBlockVolume } from './support/kubelet-standin.js';
import { PvControllerStandIn } from './support/pv-controller-standin.js';
import { parseQuantity } from './support/quantity.js';
import { writeRandomly } from './support/random-writes.js';
import { ServiceStandIn } from './support/service-standin.js';
import { goClientAsync, goExtents, type GoClientResult } from './support/snapshot-metadata-client.js';
import { healthy, makeCertificates } from './support/snapshot-metadata-sidecar.js';
import { missingTools, suiteUnless } from './tools.js';

const NODES = ['node-a', 'node-b', 'node-c'] as const;
/** The sidecars of every node's plugin pod; csi-resizer runs on the first node only. */
const SIDECARS: ChartSidecar[] = ['csi-provisioner', 'csi-snapshotter', 'csi-snapshot-metadata'];
const RELEASE = 'cbt-csi';
const SYSTEM = 'cbt-system';
const APP = 'app';
/** The backup application, bound to the chart's backup-client role. */
const CLIENT = { namespace: 'backup', name: 'backup-app' };
const TLS_SECRET = 'snapshot-metadata-tls';
const CAPACITY = 32 * MiB;
const GROWN = 48 * MiB;
const BLOCK = 4096;
const WRITES = 24;
const seed = Number(process.env.CBT_E2E_SEED ?? Date.now() % 2 ** 31);

/** A VolumeSnapshot's name and the driver's handle of its snapshot. */
type Snap = { name: string; handle: string };

/** What one node holds: its claim, published device, writes and snapshots. */
interface NodeData {
  pod: PluginPod;
  kubelet: KubeletStandIn;
  claim: string;
  pv?: KubeObject;
  device?: PublishedBlockVolume;
  /** The device's content at snapshot 1. */
  atSnapshot1: Buffer;
  written1: Set<number>;
  written2: Set<number>;
  /** VolumeSnapshot names and the driver's handles. */
  snapshots: Snap[];
}

let cluster: HeadlessCluster;
let pvController: PvControllerStandIn;
let service: ServiceStandIn;
let clientKubeconfig = '';
let smsAddress = '';
const data: NodeData[] = [];
const started = Date.now();

function missing(): string | undefined {
  return (
    missingForHeadlessCluster([...SIDECARS, 'csi-resizer']) ??
    missingTools(['snapshot-metadata-client']) ??
    (sh('sh', ['-c', 'command -v openssl || true']).trim() === '' ? 'openssl is not installed' : undefined)
  );
}

const sorted = (s: Iterable<number>) => [...s].sort((a, b) => a - b);
const union = (a: Set<number>, b: Set<number>) => new Set([...a, ...b]);

function blocksOf(extents: readonly Extent[]): number[] {
  const out = new Set<number>();
  for (const e of extents) for (let b = e.offset / BLOCK; b < (e.offset + e.length) / BLOCK; b++) out.add(b);
  return sorted(out);
}

async function collect(listing: ExtentListing | Promise<ExtentListing>): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of await listing) out.push(e);
  return out;
}

const claimPath = (name: string) => `/api/v1/namespaces/${APP}/persistentvolumeclaims/${name}`;
const scratch = (name: string) => path.join(cluster.dir, `scratch-${name}`);
const driverLog = (pod: PluginPod) => fs.readFileSync(pod.processes().find((p) => p.name === 'cbt-csi')!.log, 'utf8');
/** The driver's request log lines (pino JSON) of a method. */
const rpcLines = (pod: PluginPod, method: string) =>
  driverLog(pod)
    .split('\n')
    .filter((l) => l.includes('"msg":"rpc"') && l.includes(`"method":"${method}"`))
    .map((l) => JSON.parse(l) as { code: string; forwardedTo?: string });

/** The Go client through the service: allocated of a VolumeSnapshot, or the delta from `base`. */
const goList = (snapshot: string, base?: string) =>
  goClientAsync('list', ['-n', APP, '-s', snapshot, ...(base ? ['-p', base] : [])], clientKubeconfig);

/**
 * Kubelet's readiness probe of each pod's csi-snapshot-metadata (the chart's: GET /health): the process last
 * seen healthy. The pod is a ready endpoint of the Service only while that process is still the one running.
 */
const healthyPid = new Map<PluginPod, number | undefined>();
const sidecarOf = (pod: PluginPod) => pod.processes().find((p) => p.name === 'csi-snapshot-metadata')!;
const endpointReady = (pod: PluginPod) => pod.ready() && healthyPid.get(pod) === sidecarOf(pod).child.pid;
let prober: NodeJS.Timeout | undefined;
function startReadinessProbes(httpPorts: Map<PluginPod, number>): void {
  let probing = false;
  prober = setInterval(async () => {
    if (probing) return;
    probing = true;
    for (const [pod, port] of httpPorts) {
      const pid = sidecarOf(pod).child.pid;
      healthyPid.set(pod, (await healthy(port)) ? pid : undefined);
    }
    probing = false;
  }, 250);
}

/** Waits until the pod is a ready endpoint of the Service. */
async function waitReady(pod: PluginPod): Promise<void> {
  const deadline = Date.now() + 120_000;
  while (!endpointReady(pod)) {
    if (Date.now() > deadline) throw new Error(`the plugin pod on ${pod.nodeName} not ready after 120 s`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

suiteUnless(
  missing(),
  'headless cluster, mode daemonset: three nodes, each its own driver and sidecars, one SnapshotMetadataService',
  () => {
    beforeAll(async () => {
      // The sidecars' serving certificate: the Service's names, and 127.0.0.1 where the Service stand-in listens.
      const certDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-certs-'));
      const serviceName = `${RELEASE}-snapshot-metadata`;
      let certs: { ca: string; crt: string; key: string };
      try {
        certs = makeCertificates(certDir, [serviceName, `${serviceName}.${SYSTEM}`, `${serviceName}.${SYSTEM}.svc`]);
      } finally {
        fs.rmSync(certDir, { recursive: true, force: true });
      }
      cluster = await startHeadlessCluster({
        nodes: NODES,
        release: RELEASE,
        namespace: SYSTEM,
        values: {
          mode: 'daemonset',
          snapshotMetadata: { tls: { mode: 'secret', existingSecret: TLS_SECRET, caBundle: certs.ca } },
          backupClientRole: { serviceAccounts: [CLIENT] },
        },
        namespaces: [CLIENT.namespace, APP],
        objects: [
          {
            apiVersion: 'v1',
            kind: 'Secret',
            type: 'kubernetes.io/tls',
            metadata: { name: TLS_SECRET, namespace: SYSTEM },
            stringData: { 'tls.crt': certs.crt, 'tls.key': certs.key, 'ca.crt': certs.ca },
          },
          { apiVersion: 'v1', kind: 'ServiceAccount', metadata: CLIENT },
        ],
        sidecars: SIDECARS,
        distributedSnapshotting: true,
      });
      await cluster.pods[0]!.startSidecar('csi-resizer');
      pvController = new PvControllerStandIn(cluster);

      // The chart's one Service, its endpoints the sidecar of every plugin pod that is ready.
      const { grpcPort, httpPort } = cluster.values.snapshotMetadata as { grpcPort: number; httpPort: number };
      const endpoints = [];
      const httpPorts = new Map<PluginPod, number>();
      for (const pod of cluster.pods) {
        const { ports } = await pod.container('csi-snapshot-metadata');
        httpPorts.set(pod, ports[httpPort]!);
        endpoints.push({ name: pod.nodeName, port: ports[grpcPort]!, ready: () => endpointReady(pod) });
      }
      startReadinessProbes(httpPorts);
      for (const pod of cluster.pods) await waitReady(pod);
      service = await ServiceStandIn.start(endpoints);
      const smsPath = `/apis/cbt.storage.k8s.io/v1beta1/snapshotmetadataservices/${cluster.driverName}`;
      smsAddress = (await cluster.api.get(smsPath)).spec.address as string;
      await cluster.api.patch(smsPath, { spec: { address: service.address } });

      const token = await cluster.serviceAccountToken(CLIENT.namespace, CLIENT.name);
      clientKubeconfig = cluster.writeKubeconfig('backup-app', token);
      for (const [i, pod] of cluster.pods.entries())
        data.push({
          pod,
          kubelet: new KubeletStandIn(cluster, pod),
          claim: `data-${NODES[i]}`,
          atSnapshot1: Buffer.alloc(0),
          written1: new Set(),
          written2: new Set(),
          snapshots: [],
        });
      console.log(
        `daemonset cluster up in ${((Date.now() - started) / 1000).toFixed(1)} s (${cluster.startup.join(', ')}; seed ${seed}); it runs:\n${whatRan(cluster).join('\n')}`,
      );
    }, 480_000); // the whole file takes under 3 minutes at load 24; start-up alone took 127 s at load 35

    afterAll(async () => {
      clearInterval(prober);
      for (const d of data) d.kubelet.close();
      await service?.close();
      await cluster?.stop();
      console.log(`daemonset cluster suite: ${((Date.now() - started) / 1000).toFixed(1)} s wall`);
    }, 120_000);

    test("helm renders mode daemonset: a plugin pod on each node, its sidecars with the chart's args, one csi-resizer leader-elected", async () => {
      const kinds = cluster.objects.map((o) => o.kind);
      expect(kinds).toContain('DaemonSet');
      expect(kinds).not.toContain('StatefulSet');
      const pods = await cluster.api.list(`/api/v1/namespaces/${SYSTEM}/pods`);
      expect(pods.map((p) => [p.spec.nodeName, p.status.podIP]).sort()).toEqual(
        cluster.pods.map((p) => [p.nodeName, p.podIP]),
      );
      for (const pod of cluster.pods) {
        const names = pod.processes().map((p) => p.name);
        expect(names.sort()).toEqual(
          ['cbt-csi', ...SIDECARS, ...(pod === cluster.pods[0] ? ['csi-resizer'] : [])].sort(),
        );
        for (const p of pod.processes().filter((q) => q.name !== 'cbt-csi')) {
          const view = await pod.container(p.name);
          expect(p.command.slice(1, -1)).toEqual(view.args);
        }
        const args = (name: string) => pod.processes().find((p) => p.name === name)!.command;
        // Each node's provisioner and snapshotter serve their own node only.
        expect(args('csi-provisioner')).toContain('--node-deployment');
        expect(args('csi-snapshotter')).toContain('--node-deployment');
        expect((await pod.container('csi-provisioner')).env.NODE_NAME).toBe(pod.nodeName);
        // The driver listens for its peers on its pod IP, mutual TLS, and finds them by listing the pods.
        const driver = args('cbt-csi');
        expect(driver).toContain(`--node-id=${pod.nodeName}`);
        expect(driver.find((a) => a.startsWith('--peer-listen='))).toMatch(
          new RegExp(`^--peer-listen=${pod.podIP.replaceAll('.', '\\.')}:\\d+$`),
        );
        expect(driver).toContain('--peer-discovery=kubernetes');
      }
      const resizer = cluster.pods[0]!.processes().find((p) => p.name === 'csi-resizer')!.command;
      expect(resizer).toContain('--leader-election');
      expect(resizer).toContain(`--leader-election-namespace=${SYSTEM}`);
      await cluster.waitFor(
        `/apis/coordination.k8s.io/v1/namespaces/${SYSTEM}/leases/external-resizer-${cluster.driverName.replaceAll('.', '-')}`,
        (o) => Boolean(o?.spec?.holderIdentity),
        "csi-resizer's leader lease",
      );
      // One Service for the cluster: it selects the plugin pods of every node, and is the SnapshotMetadataService's address.
      const svc = cluster.objects.find(
        (o) => o.kind === 'Service' && o.metadata.name === `${RELEASE}-snapshot-metadata`,
      );
      expect(svc).toBeDefined();
      for (const pod of pods) expect(pod.metadata.labels).toMatchObject(svc!.spec.selector);
      expect(smsAddress).toBe(
        `${RELEASE}-snapshot-metadata.${SYSTEM}:${(cluster.values.snapshotMetadata as { servicePort: number }).servicePort}`,
      );
    });

    test('each node registers from NodeGetInfo: its Node labels and CSINode carry its own node ID and topology', async () => {
      for (const d of data) {
        const { nodeId, topology } = await d.kubelet.registerNode();
        expect(nodeId).toBe(d.pod.nodeName);
        expect(topology).toEqual({ 'topology.cbt.csi.dev/node': d.pod.nodeName });
        const csiNode = await cluster.api.get(`/apis/storage.k8s.io/v1/csinodes/${d.pod.nodeName}`);
        expect(csiNode.spec.drivers).toEqual([
          expect.objectContaining({ name: cluster.driverName, nodeID: nodeId, topologyKeys: Object.keys(topology) }),
        ]);
        expect((await cluster.api.get(`/api/v1/nodes/${d.pod.nodeName}`)).metadata.labels).toMatchObject(topology);
      }
    });

    test("a claim on each node: the scheduler's selected node's csi-provisioner creates it in that node's driver", async () => {
      const sc = await cluster.api.get(
        `/apis/storage.k8s.io/v1/storageclasses/${(cluster.values.storageClass as { name: string }).name}`,
      );
      expect(sc.volumeBindingMode).toBe('WaitForFirstConsumer');
      for (const d of data) {
        await cluster.api.create(`/api/v1/namespaces/${APP}/persistentvolumeclaims`, {
          apiVersion: 'v1',
          kind: 'PersistentVolumeClaim',
          metadata: { name: d.claim, namespace: APP },
          spec: {
            storageClassName: sc.metadata.name,
            volumeMode: 'Block',
            accessModes: ['ReadWriteOnce'],
            resources: { requests: { storage: `${CAPACITY / MiB}Mi` } },
          },
        });
        // The scheduler's part: it picked this node for the claim's pod, and says so on the claim.
        await cluster.api.patch(claimPath(d.claim), {
          metadata: { annotations: { 'volume.kubernetes.io/selected-node': d.pod.nodeName } },
        });
        await pvController.nameProvisioner(APP, d.claim);
      }
      for (const d of data) {
        d.pv = await pvController.bindWhenProvisioned(APP, d.claim);
        const handle = d.pv.spec.csi.volumeHandle as string;
        expect(handle).toMatch(new RegExp(`@${d.pod.nodeName}$`));
        expect(JSON.stringify(d.pv.spec.nodeAffinity.required)).toBe(
          JSON.stringify({
            nodeSelectorTerms: [
              {
                matchExpressions: [{ key: 'topology.cbt.csi.dev/node', operator: 'In', values: [d.pod.nodeName] }],
              },
            ],
          }),
        );
        // In that node's store and no other's.
        for (const other of data) {
          const controller = new ServiceClient(Controller, other.pod.csiEndpoint);
          try {
            const ids = (await controller.call('listVolumes', {})).entries.map((e) => e.volume!.volumeId);
            expect(ids.includes(handle), `${handle} listed by ${other.pod.nodeName}`).toBe(other === d);
          } finally {
            controller.close();
          }
        }
        const pod = await cluster.api.create(`/api/v1/namespaces/${APP}/pods`, {
          apiVersion: 'v1',
          kind: 'Pod',
          metadata: { name: `writer-${d.pod.nodeName}`, namespace: APP },
          spec: {
            nodeName: d.pod.nodeName,
            containers: [
              {
                name: 'app',
                image: 'registry.k8s.io/pause:3.10',
                volumeDevices: [{ name: 'data', devicePath: '/dev/xvda' }],
              },
            ],
            volumes: [{ name: 'data', persistentVolumeClaim: { claimName: d.claim } }],
          },
        });
        d.device = await d.kubelet.publishBlockVolume(pod, d.claim);
      }
    });

    test("writes and two VolumeSnapshots on every node, each cut by its own node's csi-snapshotter", async () => {
      const random = mulberry32(seed);
      const snapshot = (d: NodeData, name: string) =>
        cluster.api.create(`/apis/snapshot.storage.k8s.io/v1/namespaces/${APP}/volumesnapshots`, {
          apiVersion: 'snapshot.storage.k8s.io/v1',
          kind: 'VolumeSnapshot',
          metadata: { name, namespace: APP },
          spec: {
            volumeSnapshotClassName: (cluster.values.volumeSnapshotClass as { name: string }).name,
            source: { persistentVolumeClaimName: d.claim },
          },
        });
      const readyAll = async (phase: number) => {
        for (const d of data) {
          const name = `${d.pod.nodeName}-${phase}`;
          const vs = await cluster.waitFor(
            `/apis/snapshot.storage.k8s.io/v1/namespaces/${APP}/volumesnapshots/${name}`,
            (o) => o?.status?.readyToUse === true,
            `VolumeSnapshot ${name} readyToUse`,
          );
          const content = await cluster.api.get(
            `/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/${vs!.status.boundVolumeSnapshotContentName}`,
          );
          // snapshot-controller gave it to the node holding the volume; that node's driver cut it.
          expect(content.metadata.labels?.['snapshot.storage.kubernetes.io/managed-by']).toBe(d.pod.nodeName);
          expect(content.status.snapshotHandle).toMatch(new RegExp(`@${d.pod.nodeName}$`));
          d.snapshots.push({ name, handle: content.status.snapshotHandle as string });
        }
      };
      const models = data.map(() => Buffer.alloc(CAPACITY));
      for (const [i, d] of data.entries())
        d.written1 = writeRandomly(d.device!.targetPath, random, WRITES, {
          capacity: CAPACITY,
          blockSize: BLOCK,
          scratch: scratch(d.pod.nodeName),
          model: models[i],
        });
      for (const d of data) await snapshot(d, `${d.pod.nodeName}-1`);
      await readyAll(1);
      for (const [i, d] of data.entries()) {
        d.atSnapshot1 = Buffer.from(models[i]!);
        d.written2 = writeRandomly(d.device!.targetPath, random, WRITES, {
          capacity: CAPACITY,
          blockSize: BLOCK,
          scratch: scratch(d.pod.nodeName),
          model: models[i],
          rewriteOf: d.written1,
        });
      }
      for (const d of data) await snapshot(d, `${d.pod.nodeName}-2`);
      await readyAll(2);
    });

    test('Go client through the one service address: allocated and delta of every node’s snapshots, exact, whichever sidecar answers', async () => {
      const before = service.routed.length;
      for (const d of data) {
        const [s1, s2] = d.snapshots as [Snap, Snap];
        // Three connections in a row: the Service sends one to each node's sidecar, owner or not.
        for (let i = 0; i < NODES.length; i++) {
          const r = await goList(s1.name);
          expect(r.error, `allocated of ${s1.name}`).toBeNull();
          expect(blocksOf(goExtents(r.records))).toEqual(sorted(d.written1));
        }
        const delta = await goList(s2.name, s1.name);
        expect(delta.error, `delta ${s1.name}..${s2.name}`).toBeNull();
        expect(blocksOf(goExtents(delta.records))).toEqual(sorted(d.written2));
        const allocated2 = await goList(s2.name);
        expect(blocksOf(goExtents(allocated2.records))).toEqual(sorted(union(d.written1, d.written2)));
      }
      const routed = service.routed.slice(before);
      for (const node of NODES) expect(routed.filter((n) => n === node).length, node).toBeGreaterThanOrEqual(3);
      // Requests that landed on a node that does not own the snapshot were passed to its owner.
      for (const d of data)
        for (const other of data.filter((o) => o !== d))
          expect(
            rpcLines(other.pod, 'GetMetadataAllocated').some(
              (l) => l.forwardedTo === d.pod.nodeName && l.code === 'OK',
            ),
            `${other.pod.nodeName} forwarded allocated to ${d.pod.nodeName}`,
          ).toBe(true);
    });

    test('Go client verify through the service: each node’s snapshot 2 rebuilt from snapshot 1 plus the delta, and in full', async () => {
      for (const d of data) {
        const [s1, s2] = d.snapshots as [Snap, Snap];
        const base = path.join(cluster.dir, `base-${d.pod.nodeName}.img`);
        fs.writeFileSync(base, d.atSnapshot1);
        // The device holds snapshot 2's data: nothing was written after it.
        const source = ['--source', d.device!.targetPath];
        const incremental = await goClientAsync(
          'verify',
          ['-n', APP, '-s', s2.name, '-p', s1.name, ...source, '--base', base, '--target', `${base}.2`],
          clientKubeconfig,
        );
        expect(incremental.error).toBeNull();
        expect(incremental.summary).toMatchObject({ verified: true, volumeCapacityBytes: CAPACITY });
        const full = await goClientAsync(
          'verify',
          ['-n', APP, '-s', s2.name, ...source, '--target', `${base}.full`],
          clientKubeconfig,
        );
        expect(full.error).toBeNull();
        expect(full.summary).toMatchObject({ verified: true });
      }
    });

    test('TypeScript client (Kubernetes mode) through the service: allocated and delta of every node’s snapshots, exact', async () => {
      for (const d of data) {
        const [s1, s2] = d.snapshots as [Snap, Snap];
        // A new client each time: a new connection, so a new pick of the Service's endpoints.
        const client = connectKubernetes({ namespace: APP, kubeconfig: clientKubeconfig });
        try {
          expect(blocksOf(await collect(client.allocated(s1.name, { maxResults: 5 })))).toEqual(sorted(d.written1));
          expect(blocksOf(await collect(client.delta(s1.name, s2.name)))).toEqual(sorted(d.written2));
          expect(blocksOf(await collect(client.deltaFromHandle(d.snapshots[0]!.handle, s2.name)))).toEqual(
            sorted(d.written2),
          );
        } finally {
          await client.close();
        }
      }
    });

    test("one node's driver killed: its snapshots fail UNAVAILABLE naming it, the other nodes' still answer exactly", async () => {
      const [a, b, c] = data as [NodeData, NodeData, NodeData];
      // The data plane's crash recovery is tested on its own (test/dataplane); here the device is let go first.
      await b.kubelet.unpublishBlockVolume(b.device!);
      b.device = undefined;
      await b.pod.killDriver('SIGKILL');
      const unavailable = (r: GoClientResult) => {
        expect(r.status).toBe(1);
        expect(r.error).toMatchObject({ code: 'Unavailable' });
        expect(String(r.error!.message)).toContain(b.pod.nodeName);
      };
      // Both ready sidecars (node-a's and node-c's) get one of these: each driver says the owner is unreachable.
      const before = service.routed.length;
      unavailable(await goList(b.snapshots[0]!.name));
      unavailable(await goList(b.snapshots[1]!.name, b.snapshots[0]!.name));
      expect(service.routed.slice(before).sort()).toEqual([a.pod.nodeName, c.pod.nodeName]);
      for (const d of [a, c]) {
        const r = await goList(d.snapshots[1]!.name, d.snapshots[0]!.name);
        expect(r.error).toBeNull();
        expect(blocksOf(goExtents(r.records))).toEqual(sorted(d.written2));
      }
      const client = connectKubernetes({
        namespace: APP,
        kubeconfig: clientKubeconfig,
        retry: { maxAttempts: 2, initialDelayMs: 50 },
      });
      try {
        const err = await collect(client.allocated(b.snapshots[0]!.name)).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(RetriesExhaustedError);
        expect((err as RetriesExhaustedError).code).toBe('UNAVAILABLE');
        expect((err as RetriesExhaustedError).driverMessage).toContain(b.pod.nodeName);
        for (const d of [a, c])
          expect(blocksOf(await collect(client.allocated(d.snapshots[0]!.name)))).toEqual(sorted(d.written1));
      } finally {
        await client.close();
      }
      // While its driver was down, the Service sent node-b's sidecar no connection.
      expect(service.routed.slice(before)).not.toContain(b.pod.nodeName);
    });

    test('the driver restarted on its store: every node’s snapshots answer again, exactly', async () => {
      const b = data[1]!;
      await b.pod.restart();
      await waitReady(b.pod);
      for (const d of data) {
        for (let i = 0; i < NODES.length; i++) {
          const r = await goList(d.snapshots[1]!.name, d.snapshots[0]!.name);
          expect(r.error, `delta of ${d.pod.nodeName}'s snapshots after the restart`).toBeNull();
          expect(blocksOf(goExtents(r.records))).toEqual(sorted(d.written2));
        }
      }
      const client = connectKubernetes({ namespace: APP, kubeconfig: clientKubeconfig });
      try {
        for (const d of data)
          expect(blocksOf(await collect(client.allocated(d.snapshots[1]!.name)))).toEqual(
            sorted(union(d.written1, d.written2)),
          );
      } finally {
        await client.close();
      }
    });

    test("expanding node-c's claim: the one csi-resizer (node-a) reaches node-c's driver, kubelet there grows the device", async () => {
      const a = data[0]!;
      const c = data[2]!;
      await cluster.api.patch(claimPath(c.claim), {
        spec: { resources: { requests: { storage: `${GROWN / MiB}Mi` } } },
      });
      await cluster.waitFor(
        claimPath(c.claim),
        (o) => o?.status?.allocatedResourceStatuses?.storage === 'NodeResizePending',
        'csi-resizer to expand the volume and leave the node part pending',
      );
      expect(
        parseQuantity(
          (await cluster.api.get(`/api/v1/persistentvolumes/${c.pv!.metadata.name}`)).spec.capacity.storage,
        ),
      ).toBe(GROWN);
      expect(rpcLines(a.pod, 'ControllerExpandVolume')).toEqual([
        expect.objectContaining({ code: 'OK', forwardedTo: c.pod.nodeName }),
      ]);
      expect(await c.kubelet.finishExpansion(APP, c.claim, c.device!)).toBe(GROWN);
      expect(Number(sh('blockdev', ['--getsize64', c.device!.targetPath]).trim())).toBe(GROWN);
      const controller = new ServiceClient(Controller, c.pod.csiEndpoint);
      try {
        const volume = await controller.call('controllerGetVolume', { volumeId: c.device!.volumeId });
        expect(Number(volume.volume!.capacityBytes)).toBe(GROWN);
      } finally {
        controller.close();
      }
    });

    test('everything stops by itself: no process, mount or loop device is left', async () => {
      for (const d of data) {
        if (d.device) await d.kubelet.unpublishBlockVolume(d.device);
        d.device = undefined;
        d.kubelet.close();
      }
      clearInterval(prober);
      await service.close();
      const forced = await cluster.stop();
      expect(forced).toEqual([]);
      expect(cluster.leftovers()).toEqual([]);
    }, 120_000);
  },
);
