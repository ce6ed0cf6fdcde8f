/**
 * The chart, the upstream controllers and the driver together, in a headless Kubernetes cluster
 * (support/headless-cluster.ts): etcd and kube-apiserver, the chart installed by helm, snapshot-controller,
 * and `cbt-csi serve` with csi-provisioner, csi-snapshotter and csi-resizer as processes with the chart's
 * own args and ServiceAccount. Only kubelet's and kube-controller-manager's parts are done by hand
 * (support/kubelet-standin.ts, support/pv-controller-standin.ts).
 *
 * The flow, in order (each test builds on the one before): a Block claim provisioned by csi-provisioner
 * and published to a pod; seeded random writes through the device; VolumeSnapshot 1; more writes with
 * rewrites; VolumeSnapshot 2; the driver's own GetMetadataAllocated/GetMetadataDelta (CSI direct, through
 * src/client) name exactly the blocks written; expansion through csi-resizer reaches the device; a claim
 * restored from VolumeSnapshot 1 reads as the volume did then; deleting the VolumeSnapshots deletes the
 * driver's snapshots, deleting the claims its volumes; and everything stops, leaving no process, mount or
 * loop device. Replay a run's data with CBT_E2E_SEED.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { connectCsiDirect } from '../../src/client/index.js';
import { Controller, Identity } from '../../src/gen/csi/v1/csi_pb.js';
import { MiB, directRead, sh } from '../e2e/support/node-env.js';
import { ServiceClient } from '../support/csi-client.js';
import { mulberry32 } from '../support/random.js';
import {
  missingForHeadlessCluster,
  startHeadlessCluster,
  whatRan,
  type ChartSidecar,
  type HeadlessCluster,
} from './support/headless-cluster.js';
import type { KubeObject } from './support/kube-api.js';
import { KubeletStandIn, type PublishedBlockVolume } from './support/kubelet-standin.js';
import { PvControllerStandIn } from './support/pv-controller-standin.js';
import { writeRandomly as writeBlocksRandomly } from './support/random-writes.js';
import { parseQuantity } from './support/quantity.js';
import { suiteUnless, tool } from './tools.js';

const SIDECARS: ChartSidecar[] = ['csi-provisioner', 'csi-snapshotter', 'csi-resizer'];
const APP = 'app';
const CAPACITY = 64 * MiB;
const GROWN = 96 * MiB;
const BLOCK = 4096;
/** Writes per phase: each is a dd (O_DIRECT, fsync) through the device and the driver's FUSE server. */
const WRITES = 64;
const seed = Number(process.env.CBT_E2E_SEED ?? Date.now() % 2 ** 31);

let cluster: HeadlessCluster;
let kubelet: KubeletStandIn;
let pvController: PvControllerStandIn;
let controller: ServiceClient<typeof Controller>;
const started = Date.now();

// State the flow carries from one test to the next.
const model = Buffer.alloc(CAPACITY);
let atSnapshot1 = Buffer.alloc(0);
let writtenBeforeSnapshot1 = new Set<number>();
let writtenBetweenSnapshots = new Set<number>();
let pod: KubeObject;
let data: PublishedBlockVolume | undefined;
const snapshotHandles: string[] = [];

const ns = (kind: string) =>
  kind === 'VolumeSnapshot'
    ? `/apis/snapshot.storage.k8s.io/v1/namespaces/${APP}/volumesnapshots`
    : kind === 'PersistentVolumeClaim'
      ? `/api/v1/namespaces/${APP}/persistentvolumeclaims`
      : `/api/v1/namespaces/${APP}/pods`;

/** A pod using these claims as raw devices; it is scheduled to the node but never runs (no kubelet). */
async function createPod(name: string, claims: string[]): Promise<KubeObject> {
  return cluster.api.create(ns('Pod'), {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name, namespace: APP },
    spec: {
      nodeName: cluster.nodeName,
      containers: [
        {
          name: 'app',
          image: 'registry.k8s.io/pause:3.10',
          volumeDevices: claims.map((c, i) => ({ name: c, devicePath: `/dev/xvd${'abcdef'[i]}` })),
        },
      ],
      volumes: claims.map((c) => ({ name: c, persistentVolumeClaim: { claimName: c } })),
    },
  });
}

/** A Block claim of the chart's StorageClass, provisioned by csi-provisioner and bound; resolves with its PV. */
async function provisionClaim(name: string, dataSource?: { kind: string; name: string }): Promise<KubeObject> {
  await cluster.api.create(ns('PersistentVolumeClaim'), {
    apiVersion: 'v1',
    kind: 'PersistentVolumeClaim',
    metadata: { name, namespace: APP },
    spec: {
      storageClassName: (cluster.values.storageClass as { name: string }).name,
      volumeMode: 'Block',
      accessModes: ['ReadWriteOnce'],
      resources: { requests: { storage: `${CAPACITY / MiB}Mi` } },
      ...(dataSource ? { dataSource: { apiGroup: 'snapshot.storage.k8s.io', ...dataSource } } : {}),
    },
  });
  await pvController.nameProvisioner(APP, name);
  return pvController.bindWhenProvisioned(APP, name);
}

/** Seeded random writes through the device, into the model too. */
const writeRandomly = (device: string, random: () => number, count: number, rewriteOf?: Set<number>) =>
  writeBlocksRandomly(device, random, count, {
    capacity: CAPACITY,
    blockSize: BLOCK,
    scratch: scratch(),
    model,
    rewriteOf,
  });

/** Creates a VolumeSnapshot of the data claim and waits until snapshot-controller reports it ready; resolves with the driver's snapshot ID. */
async function snapshot(name: string): Promise<string> {
  await cluster.api.create(ns('VolumeSnapshot'), {
    apiVersion: 'snapshot.storage.k8s.io/v1',
    kind: 'VolumeSnapshot',
    metadata: { name, namespace: APP },
    spec: {
      volumeSnapshotClassName: (cluster.values.volumeSnapshotClass as { name: string }).name,
      source: { persistentVolumeClaimName: 'data' },
    },
  });
  const vs = await cluster.waitFor(
    `${ns('VolumeSnapshot')}/${name}`,
    (o) => o?.status?.readyToUse === true,
    `VolumeSnapshot ${name} readyToUse`,
  );
  const content = await cluster.api.get(
    `/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/${vs!.status.boundVolumeSnapshotContentName}`,
  );
  expect(content.spec.driver).toBe(cluster.driverName);
  expect(content.status.readyToUse).toBe(true);
  return content.status.snapshotHandle as string;
}

/** The blocks a CSI-direct listing names, re-chunked to the volume's block size. */
async function blocksOf(listing: Promise<AsyncIterable<{ offset: number; length: number }>>): Promise<number[]> {
  const blocks: number[] = [];
  for await (const e of await listing) {
    expect(e.length).toBe(BLOCK);
    blocks.push(e.offset / BLOCK);
  }
  return blocks;
}
const scratch = () => path.join(cluster.dir, 'scratch');
const sorted = (s: Set<number>) => [...s].sort((a, b) => a - b);

const deviceBytes = (device: string) => Number(sh('blockdev', ['--getsize64', device]).trim());

suiteUnless(
  missingForHeadlessCluster(SIDECARS),
  'headless cluster: the chart, snapshot-controller and the sidecars with cbt-csi',
  () => {
    beforeAll(async () => {
      cluster = await startHeadlessCluster({ sidecars: SIDECARS });
      kubelet = new KubeletStandIn(cluster);
      pvController = new PvControllerStandIn(cluster);
      controller = new ServiceClient(Controller, cluster.csiEndpoint);
      await cluster.api.create('/api/v1/namespaces', { apiVersion: 'v1', kind: 'Namespace', metadata: { name: APP } });
      console.log(
        `headless cluster up in ${((Date.now() - started) / 1000).toFixed(1)} s (${cluster.startup.join(', ')}; seed ${seed}); it runs:\n${whatRan(cluster).join('\n')}`,
      );
    }, 240_000);

    afterAll(async () => {
      kubelet?.close();
      controller?.close();
      await cluster?.stop();
      console.log(`headless cluster suite: ${((Date.now() - started) / 1000).toFixed(1)} s wall`);
    }, 120_000);

    test('the chart is installed for real, and the driver registers on the node from NodeGetInfo', async () => {
      const { api } = cluster;
      for (const [kind, path] of [
        ['CSIDriver', `/apis/storage.k8s.io/v1/csidrivers/${cluster.driverName}`],
        [
          'StorageClass',
          `/apis/storage.k8s.io/v1/storageclasses/${(cluster.values.storageClass as { name: string }).name}`,
        ],
        [
          'VolumeSnapshotClass',
          `/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/${(cluster.values.volumeSnapshotClass as { name: string }).name}`,
        ],
        ['SnapshotMetadataService', `/apis/cbt.storage.k8s.io/v1beta1/snapshotmetadataservices/${cluster.driverName}`],
        ['ServiceAccount', `/api/v1/namespaces/${cluster.namespace}/serviceaccounts/${cluster.release}`],
      ] as const) {
        expect(await api.find(path), `${kind} installed`).toBeDefined();
        expect(
          cluster.objects.some((o) => o.kind === kind),
          `${kind} rendered by the chart`,
        ).toBe(true);
      }
      const identity = new ServiceClient(Identity, cluster.csiEndpoint);
      const plugin = await identity.call('getPluginInfo', {});
      identity.close();
      expect(plugin.name).toBe(cluster.driverName);

      const { nodeId, topology } = await kubelet.registerNode();
      expect(nodeId).toBe(cluster.nodeName);
      const csiNode = await api.get(`/apis/storage.k8s.io/v1/csinodes/${cluster.nodeName}`);
      expect(csiNode.spec.drivers).toEqual([
        expect.objectContaining({ name: cluster.driverName, nodeID: nodeId, topologyKeys: Object.keys(topology) }),
      ]);
      const node = await api.get(`/api/v1/nodes/${cluster.nodeName}`);
      expect(node.metadata.labels).toMatchObject(topology);
      expect(Object.keys(topology).length).toBeGreaterThan(0);
    });

    test("each sidecar runs with its container's args from the chart (paths and ports mapped) as the chart's ServiceAccount", async () => {
      const sidecars = cluster.processes().filter((p) => (SIDECARS as string[]).includes(p.name));
      expect(sidecars.map((p) => p.name).sort()).toEqual([...SIDECARS].sort());
      for (const p of sidecars) {
        const view = await cluster.container(p.name);
        const args = p.command.slice(1);
        const kubeconfig = args.pop()!;
        expect(kubeconfig).toMatch(/^--kubeconfig=/);
        expect(args).toEqual(view.args);
        expect(view.chartArgs).toHaveLength(args.length);
        view.chartArgs.forEach((chartArg, i) => {
          // Equal, or the same flag with a container path mapped under the cluster's directory or a port to loopback.
          if (args[i] !== chartArg)
            expect(args[i], p.name).toMatch(
              new RegExp(`^${chartArg.split('=')[0]}=((unix://)?${cluster.dir}/.*|127\\.0\\.0\\.1:\\d+|\\d+)$`),
            );
        });
        const as = (...kubectlArgs: string[]) =>
          spawnSync(tool('kubectl'), [kubeconfig, ...kubectlArgs], { encoding: 'utf8', timeout: 30_000 });
        const who = as('auth', 'whoami', '-o', 'jsonpath={.status.userInfo.username}');
        expect(who.stdout, who.stderr).toBe(`system:serviceaccount:${cluster.namespace}:${view.serviceAccount.name}`);
        expect(view.serviceAccount.name).toBe(cluster.release);
        // Not an admin: the chart grants no Secret reads.
        expect(as('auth', 'can-i', 'list', 'secrets', '--all-namespaces').stdout.trim()).toBe('no');
      }
    });

    test("csi-snapshot-metadata's container maps as the others: its ports to loopback, its TLS Secret written as kubelet mounts it", async () => {
      // Not started here (support/snapshot-metadata-sidecar.ts does): what it needs from this cluster.
      const view = await cluster.container('csi-snapshot-metadata');
      const grpcPort = (cluster.values.snapshotMetadata as { grpcPort: number }).grpcPort;
      expect(view.args).toContain(`--port=${view.ports[grpcPort]}`);
      expect(view.args).toContain(`--csi-address=${cluster.csiEndpoint.replace('unix://', '')}`);
      const file = (flag: string) => view.args.find((a) => a.startsWith(`${flag}=`))!.slice(flag.length + 1);
      expect(fs.readFileSync(file('--tls-cert'), 'utf8')).toMatch(/^-----BEGIN CERTIFICATE-----/);
      expect(fs.readFileSync(file('--tls-key'), 'utf8')).toMatch(/^-----BEGIN (RSA )?PRIVATE KEY-----/);
      expect(view.serviceAccount).toEqual({ namespace: cluster.namespace, name: cluster.release });
    });

    test('csi-provisioner provisions a Block claim in the driver; kubelet stages and publishes it to a pod', async () => {
      const pv = await provisionClaim('data');
      expect(pv.spec.csi.driver).toBe(cluster.driverName);
      expect(pv.spec.volumeMode).toBe('Block');
      expect(parseQuantity(pv.spec.capacity.storage)).toBe(CAPACITY);
      // Topology: the PV may only be used on the node the driver reported.
      expect(JSON.stringify(pv.spec.nodeAffinity)).toContain(cluster.nodeName);
      const volumes = (await controller.call('listVolumes', {})).entries.map((e) => e.volume!.volumeId);
      expect(volumes).toEqual([pv.spec.csi.volumeHandle]);

      pod = await createPod('writer', ['data']);
      data = await kubelet.publishBlockVolume(pod, 'data');
      expect(deviceBytes(data.targetPath)).toBe(CAPACITY);
    });

    test('VolumeSnapshots of the written volume become readyToUse through snapshot-controller and csi-snapshotter', async () => {
      const random = mulberry32(seed);
      const timings: string[] = [];
      const timed = async <T>(what: string, run: () => T | Promise<T>): Promise<T> => {
        const start = Date.now();
        const result = await run();
        timings.push(`${what} ${((Date.now() - start) / 1000).toFixed(1)} s`);
        return result;
      };
      writtenBeforeSnapshot1 = await timed('writes', () => writeRandomly(data!.targetPath, random, WRITES));
      snapshotHandles.push(await timed('snap-1 ready', () => snapshot('snap-1')));
      atSnapshot1 = Buffer.from(model);
      writtenBetweenSnapshots = await timed('writes', () =>
        writeRandomly(data!.targetPath, random, WRITES, writtenBeforeSnapshot1),
      );
      snapshotHandles.push(await timed('snap-2 ready', () => snapshot('snap-2')));
      console.log(`writes and snapshots: ${timings.join(', ')}`);
      const listed = (await controller.call('listSnapshots', { sourceVolumeId: data!.volumeId })).entries.map(
        (e) => e.snapshot!.snapshotId,
      );
      expect(listed.sort()).toEqual([...snapshotHandles].sort());
      // The second phase rewrote blocks of the first as well as new ones.
      expect([...writtenBetweenSnapshots].some((b) => writtenBeforeSnapshot1.has(b))).toBe(true);
      expect([...writtenBetweenSnapshots].some((b) => !writtenBeforeSnapshot1.has(b))).toBe(true);
    });

    test("the driver's GetMetadataAllocated and GetMetadataDelta (CSI direct) name exactly the blocks written", async () => {
      const [snap1, snap2] = snapshotHandles as [string, string];
      const client = connectCsiDirect(cluster.csiEndpoint);
      try {
        const allocated1 = await blocksOf(client.allocated(snap1, { blockSize: BLOCK }));
        const allocated2 = await blocksOf(client.allocated(snap2, { blockSize: BLOCK }));
        const delta = await blocksOf(client.delta(snap1, snap2, { blockSize: BLOCK }));
        expect(allocated1).toEqual(sorted(writtenBeforeSnapshot1));
        expect(allocated2).toEqual(sorted(new Set([...writtenBeforeSnapshot1, ...writtenBetweenSnapshots])));
        expect(delta).toEqual(sorted(writtenBetweenSnapshots));
        expect((await client.delta(snap1, snap2)).capacityBytes).toBe(CAPACITY);
      } finally {
        await client.close();
      }
    });

    test('expanding the claim goes through csi-resizer (ControllerExpandVolume) and kubelet (NodeExpandVolume) to the device', async () => {
      const claim = `${ns('PersistentVolumeClaim')}/data`;
      await cluster.api.patch(claim, { spec: { resources: { requests: { storage: `${GROWN / MiB}Mi` } } } });
      await cluster.waitFor(
        claim,
        (o) => o?.status?.allocatedResourceStatuses?.storage === 'NodeResizePending',
        'csi-resizer to expand the volume and leave the node part pending',
      );
      const pv = await cluster.api.get(`/api/v1/persistentvolumes/${data!.pvName}`);
      expect(parseQuantity(pv.spec.capacity.storage)).toBe(GROWN);
      expect(await kubelet.finishExpansion(APP, 'data', data!)).toBe(GROWN);
      expect(deviceBytes(data!.targetPath)).toBe(GROWN);
      const pvc = await cluster.api.get(claim);
      expect(parseQuantity(pvc.status.capacity.storage)).toBe(GROWN);
      // The driver knows the new size too.
      const volume = await controller.call('controllerGetVolume', { volumeId: data!.volumeId });
      expect(Number(volume.volume!.capacityBytes)).toBe(GROWN);
    });

    test('a claim restored from VolumeSnapshot 1 (csi-provisioner, dataSource) reads as the volume did at snapshot 1', async () => {
      const pv = await provisionClaim('restored', { kind: 'VolumeSnapshot', name: 'snap-1' });
      expect(pv.spec.csi.driver).toBe(cluster.driverName);
      const reader = await createPod('reader', ['restored']);
      const restored = await kubelet.publishBlockVolume(reader, 'restored');
      try {
        const bytes = directRead(restored.targetPath, CAPACITY, scratch());
        expect(bytes.equals(atSnapshot1)).toBe(true);
        expect(bytes.equals(model)).toBe(false);
      } finally {
        await kubelet.unpublishBlockVolume(restored);
      }
    });

    test('deleting the VolumeSnapshots deletes the snapshots in the driver (csi-snapshotter, deletionPolicy Delete)', async () => {
      expect((await controller.call('listSnapshots', {})).entries).toHaveLength(2);
      const contents = [];
      for (const name of ['snap-1', 'snap-2']) {
        const vs = await cluster.api.get(`${ns('VolumeSnapshot')}/${name}`);
        contents.push(vs.status.boundVolumeSnapshotContentName as string);
        await cluster.api.delete(`${ns('VolumeSnapshot')}/${name}`);
      }
      for (const content of contents) {
        await cluster.waitFor(
          `/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/${content}`,
          (o) => o === undefined,
          `VolumeSnapshotContent ${content} deleted`,
        );
      }
      for (const name of ['snap-1', 'snap-2'])
        await cluster.waitFor(
          `${ns('VolumeSnapshot')}/${name}`,
          (o) => o === undefined,
          `VolumeSnapshot ${name} deleted`,
        );
      expect((await controller.call('listSnapshots', {})).entries).toEqual([]);
      for (const snapshotId of snapshotHandles)
        expect((await controller.call('listSnapshots', { snapshotId })).entries).toEqual([]);
    });

    test('deleting the claims deletes the volumes in the driver (csi-provisioner, reclaimPolicy Delete)', async () => {
      await kubelet.unpublishBlockVolume(data!);
      data = undefined;
      // Pods on a node are gone once kubelet confirms; here the stand-in confirms at once.
      for (const name of ['writer', 'reader'])
        await cluster.api.delete(`${ns('Pod')}/${name}`, { gracePeriodSeconds: 0 });
      for (const claim of ['data', 'restored']) {
        await cluster.api.delete(`${ns('PersistentVolumeClaim')}/${claim}`);
        const pvName = await pvController.releaseDeleted(APP, claim);
        await pvController.unprotectDeletedPv(pvName);
        await cluster.waitFor(`/api/v1/persistentvolumes/${pvName}`, (o) => o === undefined, `PV ${pvName} deleted`);
      }
      expect((await controller.call('listVolumes', {})).entries).toEqual([]);
    });

    test('everything stops by itself: no process, mount or loop device is left', async () => {
      kubelet.close();
      controller.close();
      const forced = await cluster.stop();
      expect(forced).toEqual([]);
      expect(cluster.leftovers()).toEqual([]);
    }, 120_000);
  },
);
