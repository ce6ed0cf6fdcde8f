/**
 * Changed block tracking through the real csi-snapshot-metadata sidecar (v1.1.0, the pinned build), the
 * way a backup application in a cluster reaches it: the chart rendered by helm and applied to a real
 * kube-apiserver, the sidecar running with the chart's own args and its ServiceAccount's token, TLS with
 * the CA the SnapshotMetadataService names, and the backup client a ServiceAccount bound to the chart's
 * backup-client role. Snapshots are cut through the driver's CSI socket and imported as VolumeSnapshots
 * (support/static-snapshots.ts); data is written through devices published by the driver's Node service,
 * as kubelet publishes them.
 *
 * Checked against the writes themselves, with two clients: our Go program on the upstream iterator
 * library (scripts/ecosystem/snapshot-metadata-client: list, verify) and this project's TypeScript client
 * in Kubernetes mode, which must also equal the CSI-direct answers. Refusals: a ServiceAccount without the
 * role, a token for another audience. The sidecar killed mid-stream: the TypeScript client resumes.
 *
 * Then each metadataProfile (exact, hostpath, ceph-rbd) from a StorageClass, as the sidecar passes its
 * messages on: sizes, style, granularity, empty answers and a deleted base, against `generate`'s answers.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import { Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport, Http2SessionManager } from '@connectrpc/connect-node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import {
  connectCsiDirect,
  connectKubernetes,
  NotFoundError,
  PermissionDeniedError,
  type Extent,
  type ExtentListing,
} from '../../src/client/index.js';
import { SnapshotMetadata as K8sSnapshotMetadata } from '../../src/gen/cbt/v1alpha1/schema_pb.js';
import { createProgress } from '../../src/backup/progress.js';
import { CEPH_RBD_DEFAULT_OBJECT_SIZE, type MetadataProfileName } from '../../src/csi/metadata-profiles.js';
import { appendAnswerRun, readAnswerRuns } from '../../src/vendor/answers.js';
import { checkAnswers } from '../../src/vendor/check.js';
import { csiMetadataReader } from '../../src/vendor/csi-metadata-reader.js';
import { generate, openPathTarget } from '../../src/vendor/generate.js';
import type { PatternName } from '../../src/vendor/patterns.js';
import { BackupRepository } from '../../src/backup/repository.js';
import { restoreBackup } from '../../src/backup/restore.js';
import { jsonOf, runCli } from '../backup/support/cli.js';
import { createVolume, publish, snapshot, type Published } from '../backup/support/volumes.js';
import {
  MiB,
  blockCap,
  directRead,
  directWrite,
  missingDataPlane,
  startNodeEnv,
  type NodeEnv,
} from '../e2e/support/node-env.js';
import { mulberry32 } from '../support/random.js';
import { REPO_ROOT } from '../support/test-driver.js';
import { crdFiles, startControlPlane, type ControlPlane } from './support/control-plane.js';
import {
  kubeconfigWithToken,
  serviceAccountToken,
  startSnapshotMetadataSidecar,
  toYaml,
  type SnapshotMetadataSidecar,
} from './support/snapshot-metadata-sidecar.js';
import { type GoRecord, goClient, goExtents } from './support/snapshot-metadata-client.js';
import { createStaticSnapshot, type StaticSnapshot } from './support/static-snapshots.js';
import { COMPONENTS, missingTools, suiteUnless } from './tools.js';

const CAPACITY = 64 * MiB;
const BLOCK = 4096;
const WRITES_PER_PHASE = 60;
const RELEASE = 'cbt-csi';
const SYSTEM = 'cbt-system';
/** The application's namespace, where its VolumeSnapshots are. */
const APPS = 'apps';
/** The backup application: bound to the chart's backup-client role (chart value backupClientRole). */
const CLIENT = { namespace: 'backup', name: 'backup-app' };
/** Same namespace, no backup-client role: may only mint its own tokens and read the service's CR. */
const INTRUDER = { namespace: 'backup', name: 'intruder' };
const seed = Number(process.env.CBT_E2E_SEED ?? Date.now() % 2 ** 31);

let cp: ControlPlane;
let env: NodeEnv;
let sidecar: SnapshotMetadataSidecar;
let clientKubeconfig = '';
let intruderKubeconfig = '';
const published: Published[] = [];
/** Blocks written before snapshot 1, and between snapshots 1 and 2. */
let written1 = new Set<number>();
let written2 = new Set<number>();
let vs1: StaticSnapshot;
let vs2: StaticSnapshot;
/** A snapshot with thousands of extents, for the mid-stream kill. */
let vsMany: StaticSnapshot;
let restored1: Published;
let restored2: Published;

function missing(): string | undefined {
  const tools = missingTools([
    'helm',
    'etcd',
    'kube-apiserver',
    'kubectl',
    'csi-snapshot-metadata',
    'snapshot-metadata-client',
  ]);
  if (tools) return tools;
  if (spawnSync('openssl', ['version']).status !== 0) return 'openssl is not installed (Debian package openssl)';
  return missingDataPlane();
}

/** Random sector-aligned writes through the device (O_DIRECT); returns the blocks they touched. */
function writeRandomly(device: string, random: () => number): Set<number> {
  const touched = new Set<number>();
  for (let i = 0; i < WRITES_PER_PHASE; i++) {
    const sectors = random() < 0.8 ? 1 + Math.floor(random() * 16) : 1 + Math.floor(random() * 256);
    const length = sectors * 512;
    const offset = Math.floor(random() * ((CAPACITY - length) / 512)) * 512;
    directWrite(device, offset, randomBytes(length), env.path('scratch'));
    for (let b = Math.floor(offset / BLOCK); b <= Math.floor((offset + length - 1) / BLOCK); b++) touched.add(b);
  }
  return touched;
}

function blocksOf(extents: readonly Extent[]): number[] {
  const out = new Set<number>();
  for (const e of extents) for (let b = e.offset / BLOCK; b < (e.offset + e.length) / BLOCK; b++) out.add(b);
  return [...out].sort((a, b) => a - b);
}

const sorted = (s: Iterable<number>) => [...s].sort((a, b) => a - b);

async function collect(listing: ExtentListing | Promise<ExtentListing>): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of await listing) out.push(e);
  return out;
}

suiteUnless(
  missing(),
  `changed block tracking through csi-snapshot-metadata ${COMPONENTS['external-snapshot-metadata']!.version}`,
  () => {
    beforeAll(async () => {
      let t = Date.now();
      const phase = (what: string) => {
        process.stderr.write(`snapshot-metadata suite: ${what} in ${((Date.now() - t) / 1000).toFixed(1)} s\n`);
        t = Date.now();
      };
      cp = await startControlPlane();
      for (const file of crdFiles()) cp.kubectl(['apply', '--server-side', '-f', file]);
      cp.kubectl(['wait', '--for=condition=Established', '--timeout=60s', 'crd', '--all']);
      for (const ns of [SYSTEM, APPS, CLIENT.namespace]) cp.kubectl(['create', 'namespace', ns]);
      phase('etcd, kube-apiserver and the CRDs');

      env = await startNodeEnv();
      sidecar = await startSnapshotMetadataSidecar(cp, {
        release: RELEASE,
        namespace: SYSTEM,
        socketDir: env.dir,
        backupClients: [CLIENT],
      });
      phase('the driver, the chart applied and csi-snapshot-metadata healthy');

      // The backup application's ServiceAccount (the chart binds it), and one the chart knows nothing of,
      // given just enough to reach the sidecar: its own tokens and the service's CR.
      cp.kubectl(['apply', '-f', '-'], {
        input: toYaml([
          { apiVersion: 'v1', kind: 'ServiceAccount', metadata: CLIENT },
          { apiVersion: 'v1', kind: 'ServiceAccount', metadata: INTRUDER },
          {
            apiVersion: 'rbac.authorization.k8s.io/v1',
            kind: 'Role',
            metadata: { name: 'intruder-token', namespace: INTRUDER.namespace },
            rules: [
              {
                apiGroups: [''],
                resources: ['serviceaccounts/token'],
                resourceNames: [INTRUDER.name],
                verbs: ['create'],
              },
            ],
          },
          {
            apiVersion: 'rbac.authorization.k8s.io/v1',
            kind: 'RoleBinding',
            metadata: { name: 'intruder-token', namespace: INTRUDER.namespace },
            roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'intruder-token' },
            subjects: [{ kind: 'ServiceAccount', ...INTRUDER }],
          },
          {
            apiVersion: 'rbac.authorization.k8s.io/v1',
            kind: 'ClusterRole',
            metadata: { name: 'intruder-sms' },
            rules: [{ apiGroups: ['cbt.storage.k8s.io'], resources: ['snapshotmetadataservices'], verbs: ['get'] }],
          },
          {
            apiVersion: 'rbac.authorization.k8s.io/v1',
            kind: 'ClusterRoleBinding',
            metadata: { name: 'intruder-sms' },
            roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'ClusterRole', name: 'intruder-sms' },
            subjects: [{ kind: 'ServiceAccount', ...INTRUDER }],
          },
        ]),
      });
      clientKubeconfig = kubeconfigWithToken(
        cp,
        serviceAccountToken(cp, CLIENT.namespace, CLIENT.name),
        env.path('client.kubeconfig'),
      );
      intruderKubeconfig = kubeconfigWithToken(
        cp,
        serviceAccountToken(cp, INTRUDER.namespace, INTRUDER.name),
        env.path('intruder.kubeconfig'),
      );

      const className = sidecar.objects.find((o) => o.kind === 'VolumeSnapshotClass')!.metadata.name;
      const importSnapshot = (name: string, handle: string) =>
        createStaticSnapshot(cp, {
          namespace: APPS,
          name,
          driver: sidecar.driverName,
          snapshotHandle: handle,
          sizeBytes: CAPACITY,
          className,
        });

      // Two phases of writes, a snapshot after each, then writes that no snapshot holds.
      const random = mulberry32(seed);
      const source = await publish(env, await createVolume(env, CAPACITY));
      published.push(source);
      written1 = writeRandomly(source.device, random);
      const snap1 = await snapshot(env, source.volumeId);
      written2 = writeRandomly(source.device, random);
      const snap2 = await snapshot(env, source.volumeId);
      writeRandomly(source.device, random);
      vs1 = importSnapshot('data-1', snap1);
      vs2 = importSnapshot('data-2', snap2);

      // Every other block of the first 48 MiB: 6144 extents, far more than a stream's flow-control window.
      const many = await publish(env, await createVolume(env, CAPACITY));
      published.push(many);
      const fd = fs.openSync(many.device, 'r+');
      const block = Buffer.alloc(BLOCK, 0xa5);
      for (let offset = 0; offset < 48 * MiB; offset += 2 * BLOCK) fs.writeSync(fd, block, 0, BLOCK, offset);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      vsMany = importSnapshot('many-1', await snapshot(env, many.volumeId));

      // The snapshots' data, as PVCs restored from them would hold it.
      restored1 = await publish(env, await createVolume(env, CAPACITY, snap1));
      restored2 = await publish(env, await createVolume(env, CAPACITY, snap2));
      published.push(restored1, restored2);
      phase('volumes written, snapshotted, imported as VolumeSnapshots and restored');
    }, 300_000);

    afterAll(async () => {
      for (const p of published.reverse()) await p.release().catch(() => undefined);
      await sidecar?.stop();
      await env?.cleanup();
      await cp?.stop();
    }, 120_000);

    test(`the sidecar runs with the chart's args, only paths and ports remapped (seed ${seed})`, () => {
      expect(sidecar.args.length).toBe(sidecar.chartArgs.length + 1);
      expect(sidecar.args.at(-1)).toMatch(/^--kubeconfig=/);
      for (const [i, arg] of sidecar.chartArgs.entries()) {
        const flag = arg.split('=')[0]!;
        expect(sidecar.args[i]!.split('=')[0]).toBe(flag);
        if (flag === '--audience' || flag === '--max-streaming-duration-min') expect(sidecar.args[i]).toBe(arg);
      }
      expect(sidecar.chartArgs).toContain(`--audience=${sidecar.audience}`);
      const sms = JSON.parse(
        cp.kubectl(['get', 'snapshotmetadataservice', sidecar.driverName, '-o', 'json']).stdout,
      ) as {
        spec: { address: string; caCert: string; audience: string };
      };
      expect(sms.spec.address).toBe(sidecar.address);
      expect(Buffer.from(sms.spec.caCert, 'base64').toString()).toBe(sidecar.caPem);
    });

    test('Go client (upstream iterator), allocated: exactly the blocks written before the snapshot, paged by --max-results', () => {
      const r = goClient('list', ['-n', APPS, '-s', vs1.name, '--max-results', '7'], clientKubeconfig);
      expect(r.error).toBeNull();
      expect(r.records.length).toBeGreaterThan(1);
      for (const rec of r.records) {
        expect(rec.block_metadata.length).toBeLessThanOrEqual(7);
        expect(rec.volume_capacity_bytes).toBe(CAPACITY);
        expect(rec.block_metadata_type).toBe('VARIABLE_LENGTH');
      }
      expect(r.summary).toEqual({ records: r.records.length });
      expect(blocksOf(goExtents(r.records))).toEqual(sorted(written1));
    });

    test('Go client, allocated from a starting offset: nothing ending at or before it, everything written after it', () => {
      const start = CAPACITY / 2;
      const r = goClient('list', ['-n', APPS, '-s', vs1.name, '--starting-offset', String(start)], clientKubeconfig);
      expect(r.error).toBeNull();
      const extents = goExtents(r.records);
      for (const e of extents) expect(e.offset + e.length).toBeGreaterThan(start);
      expect(blocksOf(extents).filter((b) => b >= start / BLOCK)).toEqual(
        sorted(written1).filter((b) => b >= start / BLOCK),
      );
    });

    test('Go client, delta by name (-p) and by CSI handle (-P): exactly the blocks written between the snapshots', () => {
      const byName = goClient(
        'list',
        ['-n', APPS, '-s', vs2.name, '-p', vs1.name, '--max-results', '5'],
        clientKubeconfig,
      );
      expect(byName.error).toBeNull();
      for (const rec of byName.records) expect(rec.block_metadata.length).toBeLessThanOrEqual(5);
      expect(blocksOf(goExtents(byName.records))).toEqual(sorted(written2));
      const byHandle = goClient('list', ['-n', APPS, '-s', vs2.name, '-P', vs1.snapshotHandle], clientKubeconfig);
      expect(byHandle.error).toBeNull();
      expect(goExtents(byHandle.records)).toEqual(goExtents(byName.records));

      const start = 16 * MiB;
      const paged = goClient(
        'list',
        ['-n', APPS, '-s', vs2.name, '-p', vs1.name, '--starting-offset', String(start), '--max-results', '3'],
        clientKubeconfig,
      );
      expect(paged.error).toBeNull();
      expect(goExtents(paged.records)).toEqual(goExtents(byName.records).filter((e) => e.offset + e.length > start));
    });

    test('Go client verify: the base image plus the listed blocks rebuilds each snapshot; without the base it does not', () => {
      const scratch = env.path('scratch-verify');
      const base = env.path('base-1.img');
      fs.writeFileSync(base, directRead(restored1.device, CAPACITY, scratch));

      const full = goClient(
        'verify',
        ['-n', APPS, '-s', vs1.name, '--source', restored1.device, '--target', env.path('verify-1.img')],
        clientKubeconfig,
      );
      expect(full.error).toBeNull();
      expect(full.summary).toMatchObject({ verified: true, volumeCapacityBytes: CAPACITY });

      const incremental = goClient(
        'verify',
        [
          ...['-n', APPS, '-s', vs2.name, '-p', vs1.name],
          ...['--source', restored2.device, '--base', base, '--target', env.path('verify-2.img')],
        ],
        clientKubeconfig,
      );
      expect(incremental.error).toBeNull();
      expect(incremental.summary).toMatchObject({ verified: true });

      // The delta alone on zeros misses what snapshot 1 held: verify must see that.
      const noBase = goClient(
        'verify',
        [
          ...['-n', APPS, '-s', vs2.name, '-p', vs1.name],
          ...['--source', restored2.device, '--target', env.path('verify-3.img')],
        ],
        clientKubeconfig,
      );
      expect(noBase.status).toBe(1);
      expect(noBase.error).toMatchObject({ verified: false });
      expect(written1.has(Math.floor(Number(noBase.error!.firstDifference) / BLOCK))).toBe(true);
    });

    test("a ServiceAccount without the chart's backup-client role is refused: PERMISSION_DENIED by the sidecar", async () => {
      // The Go client names the driver, so the request reaches the sidecar, whose SubjectAccessReview says no.
      const r = goClient('list', ['-n', APPS, '-s', vs1.name, '--csi-driver', sidecar.driverName], intruderKubeconfig);
      expect(r.status).toBe(1);
      expect(r.error).toMatchObject({ code: 'PermissionDenied' });
      // The TypeScript client finds the driver through the VolumeSnapshot, which RBAC already refuses.
      const client = connectKubernetes({ namespace: APPS, kubeconfig: intruderKubeconfig });
      try {
        await expect(client.allocated(vs1.name)).rejects.toBeInstanceOf(PermissionDeniedError);
        // Told the driver, it too reaches the sidecar and is refused there.
        const direct = connectKubernetes({
          namespace: APPS,
          kubeconfig: intruderKubeconfig,
          driver: sidecar.driverName,
        });
        try {
          const err = await direct.allocated(vs1.name).catch((e: unknown) => e);
          expect(err).toBeInstanceOf(PermissionDeniedError);
          expect((err as Error).message).toMatch(/needs the backup-client role/);
        } finally {
          await direct.close();
        }
      } finally {
        await client.close();
      }
    });

    test('a token for another audience is refused: UNAUTHENTICATED; the same call with the service audience passes', async () => {
      const session = new Http2SessionManager(`https://${sidecar.address}`, undefined, { ca: sidecar.caPem });
      const raw = createClient(
        K8sSnapshotMetadata,
        createGrpcTransport({ baseUrl: `https://${sidecar.address}`, sessionManager: session }),
      );
      const call = async (securityToken: string) => {
        let messages = 0;
        for await (const _ of raw.getMetadataAllocated({ securityToken, namespace: APPS, snapshotName: vs1.name }))
          messages++;
        return messages;
      };
      try {
        for (const audience of ['https://kubernetes.default.svc', 'some-other-service']) {
          const token = serviceAccountToken(cp, CLIENT.namespace, CLIENT.name, audience);
          const err = await call(token).catch((e: unknown) => e);
          expect(err, `a token for ${audience}`).toBeInstanceOf(ConnectError);
          expect(Code[(err as ConnectError).code]).toBe('Unauthenticated');
        }
        const good = serviceAccountToken(cp, CLIENT.namespace, CLIENT.name, sidecar.audience);
        expect(await call(good)).toBeGreaterThan(0);
      } finally {
        session.abort();
      }
    });

    test('TypeScript client, Kubernetes mode: allocated and delta equal the CSI-direct answers and the Go client', async () => {
      const k8s = connectKubernetes({ namespace: APPS, kubeconfig: clientKubeconfig });
      const csi = connectCsiDirect(env.target);
      try {
        const allocated = await collect(k8s.allocated(vs1.name, { maxResults: 4 }));
        expect(allocated).toEqual(await collect(csi.allocated(vs1.snapshotHandle)));
        expect(allocated).toEqual(goExtents(goClient('list', ['-n', APPS, '-s', vs1.name], clientKubeconfig).records));
        expect(blocksOf(allocated)).toEqual(sorted(written1));

        const delta = await collect(k8s.delta(vs1.name, vs2.name));
        expect(delta).toEqual(await collect(csi.delta(vs1.snapshotHandle, vs2.snapshotHandle)));
        expect(await collect(k8s.deltaFromHandle(vs1.snapshotHandle, vs2.name, { maxResults: 2 }))).toEqual(delta);
        expect(delta).toEqual(
          goExtents(goClient('list', ['-n', APPS, '-s', vs2.name, '-p', vs1.name], clientKubeconfig).records),
        );
        expect(blocksOf(delta)).toEqual(sorted(written2));

        const start = 8 * MiB;
        expect(await collect(k8s.delta(vs1.name, vs2.name, { startingOffset: start, maxResults: 3 }))).toEqual(
          await collect(csi.delta(vs1.snapshotHandle, vs2.snapshotHandle, { startingOffset: start })),
        );
        // From inside an extent: the one that ends after the offset comes as the driver sent it, as to Go.
        const inside = delta[Math.floor(delta.length / 2)]!;
        const unaligned = inside.offset + Math.min(1234, inside.length - 1);
        const fromInside = await collect(k8s.delta(vs1.name, vs2.name, { startingOffset: unaligned }));
        expect(fromInside[0]).toEqual(inside);
        expect(fromInside).toEqual(
          goExtents(
            goClient(
              'list',
              ['-n', APPS, '-s', vs2.name, '-p', vs1.name, '--starting-offset', String(unaligned)],
              clientKubeconfig,
            ).records,
          ),
        );
        const listing = await k8s.allocated(vs1.name);
        expect([listing.capacityBytes, listing.blockMetadataType]).toEqual([CAPACITY, 'VARIABLE_LENGTH']);
        await collect(listing);
        // A VolumeSnapshot that is not there: a typed error at once, not retried.
        const missingSnapshot = await k8s.allocated('no-such').catch((e: unknown) => e);
        expect(missingSnapshot).toBeInstanceOf(NotFoundError);
        expect((missingSnapshot as Error).message).toMatch(/VolumeSnapshot apps\/no-such does not exist/);
      } finally {
        await k8s.close();
        await csi.close();
      }
    });

    test('the sidecar killed mid-stream: the TypeScript client resumes, and the extents equal an uncut run', async () => {
      const csi = connectCsiDirect(env.target);
      const uncut = await collect(csi.allocated(vsMany.snapshotHandle));
      await csi.close();
      expect(uncut).toHaveLength(6144);

      const resumes: number[] = [];
      const k8s = connectKubernetes({
        namespace: APPS,
        kubeconfig: clientKubeconfig,
        onResume: ({ offset }) => resumes.push(offset),
      });
      try {
        const listing = await k8s.allocated(vsMany.name, { maxResults: 1 });
        const got: Extent[] = [];
        const it = listing[Symbol.asyncIterator]();
        for (let i = 0; i < 100; i++) got.push((await it.next()).value as Extent);
        // One message a tuple: the rest of the stream cannot all be in flight, so this cuts it.
        await sidecar.kill('SIGKILL');
        await sidecar.restart();
        for (let r = await it.next(); !r.done; r = await it.next()) got.push(r.value);
        expect(listing.resumes).toBeGreaterThanOrEqual(1);
        // Resumed after what was consumed before the kill, and before the end: the cut was mid-stream.
        const at = resumes[0]!;
        expect(at).toBeGreaterThanOrEqual(uncut[99]!.offset + uncut[99]!.length);
        expect(at).toBeLessThan(uncut.at(-1)!.offset);
        expect(got).toEqual(uncut);
      } finally {
        await k8s.close();
      }
    });

    test('cbt-csi metadata, backup and restore with --namespace: through the sidecar, byte for byte', async () => {
      const kube = ['--namespace', APPS, '--kubeconfig', clientKubeconfig];
      const repo = env.path('repo');
      const [listed, full] = await Promise.all([
        runCli(['metadata', 'delta', vs1.name, vs2.name, ...kube, '--json']),
        runCli([
          ...['backup', '--repo', repo, '--snapshot', vs1.name, '--source', restored1.device],
          ...[...kube, '--json', '--quiet'],
        ]),
      ]);
      expect(listed.code, listed.stderr).toBe(0);
      expect(blocksOf(jsonOf<{ extents: Extent[] }>(listed).extents)).toEqual(sorted(written2));
      expect(full.code, full.stderr).toBe(0);
      const fullSummary = jsonOf<{ id: string; kind: string; snapshot: string; bytesRead: number }>(full);
      expect(fullSummary).toMatchObject({ kind: 'full', snapshot: vs1.snapshotHandle });
      expect(fullSummary.bytesRead).toBe(written1.size * BLOCK);

      const incremental = await runCli([
        ...['backup', '--repo', repo, '--snapshot', vs2.name, '--base', fullSummary.id, '--source', restored2.device],
        ...[...kube, '--json', '--quiet'],
      ]);
      expect(incremental.code, incremental.stderr).toBe(0);
      const incSummary = jsonOf<{ id: string; kind: string; bytesRead: number }>(incremental);
      expect(incSummary).toMatchObject({ kind: 'incremental' });
      expect(incSummary.bytesRead).toBe(written2.size * BLOCK);

      // Restoring is the same in both modes (test/backup covers the command): here in-process.
      const scratch = env.path('scratch-restore');
      const repository = await BackupRepository.open(repo);
      for (const [id, device, name] of [
        [fullSummary.id, restored1.device, 'restored-full.img'],
        [incSummary.id, restored2.device, 'restored-incremental.img'],
      ] as const) {
        const target = env.path(name);
        await restoreBackup(repository, id, target, createProgress('quiet'));
        expect(
          fs.readFileSync(target).equals(directRead(device, CAPACITY, scratch)),
          `${name} equals its snapshot`,
        ).toBe(true);
      }
    });

    /**
     * Each metadataProfile, measured as a backup application sees it: through the sidecar. A StorageClass
     * per profile is applied to the API server, and each volume is created with the parameters read back
     * from it, as external-provisioner passes them (its csi.storage.k8s.io/ keys removed). Data comes from
     * `cbt-csi generate` on the published device; the answers it records are the reference.
     */
    describe('metadata profiles through the sidecar (StorageClass metadataProfile)', () => {
      interface ProfileCase {
        profile: MetadataProfileName;
        capacity: number;
        base: StaticSnapshot;
        target: StaticSnapshot;
        /** Cut right after target, with no write between. */
        unchanged: StaticSnapshot;
        answers: string;
      }
      const cases = new Map<MetadataProfileName, ProfileCase>();
      const PROFILE_SETUPS: {
        profile: MetadataProfileName;
        capacity: number;
        before: readonly [PatternName, number];
        between: readonly [PatternName, number];
      }[] = [
        // 300 separate 4 KiB blocks, then 40 more: the exact profile sends them as asked.
        { profile: 'exact', capacity: CAPACITY, before: ['sparse', 300], between: ['random', 40] },
        // 300 blocks split into 4 KiB tuples: more than hostpath's 256 a message.
        { profile: 'hostpath', capacity: CAPACITY, before: ['sparse', 300], between: ['random', 40] },
        // 200 blocks spread over 1 GiB: more 4 MiB objects touched than ceph-rbd's 128 a message.
        { profile: 'ceph-rbd', capacity: 1024 * MiB, before: ['sparse', 200], between: ['random', 20] },
      ];

      beforeAll(async () => {
        const t = Date.now();
        cp.kubectl(['apply', '-f', '-'], {
          input: toYaml(
            PROFILE_SETUPS.map(({ profile }) => ({
              apiVersion: 'storage.k8s.io/v1',
              kind: 'StorageClass',
              metadata: { name: `cbt-${profile}` },
              provisioner: sidecar.driverName,
              parameters: { blockSize: '4096', metadataProfile: profile, 'csi.storage.k8s.io/fstype': 'ext4' },
            })),
          ),
        });
        const className = sidecar.objects.find((o) => o.kind === 'VolumeSnapshotClass')!.metadata.name;
        await Promise.all(
          PROFILE_SETUPS.map(async ({ profile, capacity, before, between }, i) => {
            const sc = JSON.parse(cp.kubectl(['get', 'storageclass', `cbt-${profile}`, '-o', 'json']).stdout) as {
              parameters: Record<string, string>;
            };
            const parameters = Object.fromEntries(
              Object.entries(sc.parameters).filter(([k]) => !k.startsWith('csi.storage.k8s.io/')),
            );
            const volume = await env.controller.call('createVolume', {
              name: `profile-${profile}`,
              capacityRange: { requiredBytes: BigInt(capacity) },
              volumeCapabilities: [blockCap()],
              parameters,
            });
            expect(volume.volume!.volumeContext).toMatchObject({ metadataProfile: profile });
            const device = await publish(env, volume.volume!.volumeId);
            published.push(device);
            const answers = env.path(`answers-${profile}.jsonl`);
            // What `cbt-csi generate --target DEVICE --answers FILE` runs (test/vendor runs the command itself).
            const generateRun = async ([pattern, count]: readonly [PatternName, number], s: number) => {
              const target = await openPathTarget(device.device);
              try {
                appendAnswerRun(answers, await generate({ pattern, seed: s, count, blockSize: BLOCK }, target));
              } finally {
                await target.close();
              }
            };
            await generateRun(before, seed + i);
            const base = await snapshot(env, device.volumeId);
            await generateRun(between, seed + 100 + i);
            const target = await snapshot(env, device.volumeId);
            const unchanged = await snapshot(env, device.volumeId);
            // Imported with the driver's creation times, as csi-snapshotter records them.
            const times = csiMetadataReader(env.target);
            const importAs = async (name: string, handle: string) =>
              createStaticSnapshot(cp, {
                namespace: APPS,
                name,
                driver: sidecar.driverName,
                snapshotHandle: handle,
                sizeBytes: capacity,
                className,
                createdAtMs: await times.snapshotCreatedAtMs(handle),
              });
            try {
              cases.set(profile, {
                profile,
                capacity,
                base: await importAs(`${profile}-base`, base),
                target: await importAs(`${profile}-target`, target),
                unchanged: await importAs(`${profile}-unchanged`, unchanged),
                answers,
              });
            } finally {
              times.close();
            }
          }),
        );
        process.stderr.write(`snapshot-metadata suite: profile volumes in ${((Date.now() - t) / 1000).toFixed(1)} s\n`);
      }, 180_000);

      const listing = (extra: string[]) => {
        const r = goClient('list', ['-n', APPS, ...extra], clientKubeconfig);
        expect(r.error).toBeNull();
        return r.records;
      };
      /** The answers' verdict on what the sidecar passed on, placed in time by the driver's creation times. */
      const checkAgainstAnswers = async (
        c: ProfileCase,
        reported: Extent[],
        snapshot: StaticSnapshot,
        base?: StaticSnapshot,
      ) => {
        const reader = csiMetadataReader(env.target);
        try {
          return await checkAnswers({
            runs: readAnswerRuns(c.answers),
            snapshotCreatedAtMs: await reader.snapshotCreatedAtMs(snapshot.snapshotHandle),
            ...(base ? { baseCreatedAtMs: await reader.snapshotCreatedAtMs(base.snapshotHandle) } : {}),
            reported,
            granularity: c.profile === 'ceph-rbd' ? CEPH_RBD_DEFAULT_OBJECT_SIZE : BLOCK,
          });
        } finally {
          reader.close();
        }
      };
      const messageSizes = (records: GoRecord[]) => records.map((r) => r.block_metadata.length);
      /** Every message full but the last. */
      const fullBatches = (total: number, cap: number) => [
        ...Array<number>(Math.floor(total / cap)).fill(cap),
        ...(total % cap ? [total % cap] : []),
      ];

      test('exact: VARIABLE_LENGTH, exact 4 KiB blocks; max_results honoured as asked (1000 in one message, 7 in many)', async () => {
        const c = cases.get('exact')!;
        const wide = listing(['-s', c.base.name, '--max-results', '1000']);
        const tuples = goExtents(wide);
        expect(messageSizes(wide)).toEqual([tuples.length]);
        expect(tuples.length).toBeGreaterThan(256);
        for (const r of wide) expect(r.block_metadata_type).toBe('VARIABLE_LENGTH');
        const narrow = listing(['-s', c.base.name, '--max-results', '7']);
        expect(messageSizes(narrow)).toEqual(fullBatches(tuples.length, 7));
        expect(goExtents(narrow)).toEqual(tuples);
        const report = await checkAgainstAnswers(c, tuples, c.base);
        expect(report).toMatchObject({ ok: true, missing: [], extraNotAllowed: [], extraAllowed: [] });
      });

      /**
       * The profile's allocated listing of its base snapshot, checked for paging: at most `cap` tuples a message
       * when max_results is 0 or 1000 (the same tuples either way), and `honoured` a message when asked for.
       */
      const cappedListing = (c: ProfileCase, cap: number, honoured: number, type: string): Extent[] => {
        const reference = goExtents(listing(['-s', c.base.name, '--max-results', String(honoured)]));
        expect(reference.length).toBeGreaterThan(cap);
        for (const maxResults of ['0', '1000']) {
          const records = listing(['-s', c.base.name, '--max-results', maxResults]);
          expect(messageSizes(records), `max_results ${maxResults}`).toEqual(fullBatches(reference.length, cap));
          for (const r of records) expect(r.block_metadata_type).toBe(type);
          expect(goExtents(records)).toEqual(reference);
        }
        expect(messageSizes(listing(['-s', c.base.name, '--max-results', String(honoured)]))).toEqual(
          fullBatches(reference.length, honoured),
        );
        return reference;
      };

      test('hostpath: FIXED_LENGTH 4 KiB tuples, at most 256 a message when max_results is 0 or 1000; 100 honoured', async () => {
        const c = cases.get('hostpath')!;
        const reference = cappedListing(c, 256, 100, 'FIXED_LENGTH');
        for (const t of reference) {
          expect(t.length).toBe(4096);
          expect(t.offset % 4096).toBe(0);
        }
        const report = await checkAgainstAnswers(c, reference, c.base);
        expect(report).toMatchObject({ ok: true, missing: [], extraNotAllowed: [], extraAllowed: [] });
      });

      test('ceph-rbd: VARIABLE_LENGTH whole 4 MiB objects, at most 128 a message when max_results is 0 or 1000; 50 honoured', async () => {
        const c = cases.get('ceph-rbd')!;
        const reference = cappedListing(c, 128, 50, 'VARIABLE_LENGTH');
        for (const t of reference) expect([t.offset % (4 * MiB), t.length]).toEqual([0, 4 * MiB]);
        // A superset of the written blocks, but only whole objects that hold a change.
        const report = await checkAgainstAnswers(c, reference, c.base);
        expect(report).toMatchObject({ ok: true, missing: [], extraNotAllowed: [] });
        expect(report.extraAllowed.length).toBeGreaterThan(0);
      });

      test('each profile: the delta through the sidecar matches the answers, and the TypeScript client agrees with Go and CSI direct', async () => {
        const k8s = connectKubernetes({ namespace: APPS, kubeconfig: clientKubeconfig });
        const csi = connectCsiDirect(env.target);
        try {
          for (const c of cases.values()) {
            const go = goExtents(listing(['-s', c.target.name, '-p', c.base.name]));
            const report = await checkAgainstAnswers(c, go, c.target, c.base);
            expect(report, c.profile).toMatchObject({ ok: true, mode: 'delta', missing: [], extraNotAllowed: [] });
            expect(await collect(k8s.delta(c.base.name, c.target.name)), c.profile).toEqual(go);
            expect(await collect(csi.delta(c.base.snapshotHandle, c.target.snapshotHandle)), c.profile).toEqual(go);
            const allocated = await k8s.allocated(c.base.name, { maxResults: 1000 });
            expect(allocated.blockMetadataType, c.profile).toBe(
              c.profile === 'hostpath' ? 'FIXED_LENGTH' : 'VARIABLE_LENGTH',
            );
            expect(await collect(allocated), c.profile).toEqual(
              goExtents(listing(['-s', c.base.name, '--max-results', '1000'])),
            );
          }
        } finally {
          await k8s.close();
          await csi.close();
        }
      });

      test("cbt-csi check --namespace: each profile's delta (and exact's allocated listing), asked through the sidecar and placed in time by the contents' creation times, hold against the answers; ceph-rbd's checked as exact does not", async () => {
        const kube = ['--namespace', APPS, '--kubeconfig', clientKubeconfig];
        const check = (c: ProfileCase, profile: MetadataProfileName, ...snapshots: string[]) =>
          runCli(['check', '--answers', c.answers, '--profile', profile, ...snapshots, ...kube, '--json']);
        const exact = cases.get('exact')!;
        const rbd = cases.get('ceph-rbd')!;
        // All at once: each is a process of its own.
        const [allocated, coarse, ...deltas] = await Promise.all([
          check(exact, 'exact', '--snapshot', exact.target.name),
          // ceph-rbd's listing judged without its 4 MiB allowance: whole objects are more than was written.
          check(rbd, 'exact', '--snapshot', rbd.target.name),
          ...[...cases.values()].map((c) => check(c, c.profile, '--snapshot', c.target.name, '--base', c.base.name)),
        ]);
        for (const [i, c] of [...cases.values()].entries()) {
          const delta = deltas[i]!;
          expect(delta.code, `${c.profile}: ${delta.stderr}`).toBe(0);
          expect(jsonOf(delta), c.profile).toMatchObject({ ok: true, mode: 'delta', missing: [], extraNotAllowed: [] });
        }
        expect(allocated.code, allocated.stderr).toBe(0);
        expect(jsonOf(allocated)).toMatchObject({ ok: true, mode: 'allocated', missing: [], extraNotAllowed: [] });
        expect(coarse.code, coarse.stderr).toBe(1);
        expect(jsonOf<{ ok: boolean; extraNotAllowed: unknown[] }>(coarse).extraNotAllowed.length).toBeGreaterThan(0);
      });

      test('nothing changed: exact and hostpath send one empty message with the capacity, ceph-rbd no message at all', () => {
        for (const c of cases.values()) {
          const r = goClient('list', ['-n', APPS, '-s', c.unchanged.name, '-p', c.target.name], clientKubeconfig);
          expect(r.error, c.profile).toBeNull();
          if (c.profile === 'ceph-rbd') expect(r.records, c.profile).toEqual([]);
          else {
            expect(r.records, c.profile).toHaveLength(1);
            expect(r.records[0], c.profile).toMatchObject({ block_metadata: [], volume_capacity_bytes: c.capacity });
          }
          expect(r.summary, c.profile).toEqual({ records: r.records.length });
        }
      });

      test("the base snapshot deleted: exact still answers the delta; hostpath and ceph-rbd are NOT_FOUND with their drivers' messages, through the sidecar", async () => {
        const before = new Map<MetadataProfileName, Extent[]>();
        for (const c of cases.values())
          before.set(c.profile, goExtents(listing(['-s', c.target.name, '-P', c.base.snapshotHandle])));
        // As snapshot-controller does for a VolumeSnapshot with deletionPolicy Delete: DeleteSnapshot, then the objects go.
        for (const c of cases.values()) {
          await env.controller.call('deleteSnapshot', { snapshotId: c.base.snapshotHandle });
          cp.kubectl(['delete', 'volumesnapshot', c.base.name, '-n', APPS, '--wait=false']);
        }
        const k8s = connectKubernetes({ namespace: APPS, kubeconfig: clientKubeconfig });
        try {
          const exact = cases.get('exact')!;
          expect(goExtents(listing(['-s', exact.target.name, '-P', exact.base.snapshotHandle]))).toEqual(
            before.get('exact'),
          );
          expect(await collect(k8s.deltaFromHandle(exact.base.snapshotHandle, exact.target.name))).toEqual(
            before.get('exact'),
          );
          for (const [profile, message] of [
            // The sidecar passes the driver's status on; the Go library prefixes the call it made.
            ['hostpath', /code = NotFound desc = cannot find the source snapshot$/],
            ['ceph-rbd', /code = NotFound desc = snapshot ".+" not found: /],
          ] as const) {
            const c = cases.get(profile)!;
            const r = goClient(
              'list',
              ['-n', APPS, '-s', c.target.name, '-P', c.base.snapshotHandle],
              clientKubeconfig,
            );
            expect(r.status, profile).toBe(1);
            expect(r.error, profile).toMatchObject({ code: 'NotFound' });
            expect(String(r.error!.message), profile).toMatch(message);
            const err = await collect(k8s.deltaFromHandle(c.base.snapshotHandle, c.target.name)).catch(
              (e: unknown) => e,
            );
            expect(err, profile).toBeInstanceOf(NotFoundError);
          }
        } finally {
          await k8s.close();
        }
      });
    });
  },
);

test('the Go client is built on the pinned external-snapshot-metadata (its go.mod and versions.json agree)', () => {
  const gomod = fs.readFileSync(`${REPO_ROOT}/${COMPONENTS['snapshot-metadata-client']!.source}/go.mod`, 'utf8');
  const component = COMPONENTS['external-snapshot-metadata']!;
  expect(gomod).toContain(`${component.module} ${component.version}\n`);
  expect(gomod).toMatch(
    new RegExp(`replace ${component.crds!.module} => ${component.crds!.module} ${component.localVersion}\\n`),
  );
});
