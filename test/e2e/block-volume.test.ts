/**
 * Block volume end to end (issue 4), the way a backup vendor uses changed block tracking, checked the way
 * the upstream snapshot-metadata-verifier checks it: a pod writes random data at random offsets through
 * the published device (O_DIRECT, fsync), snapshots are cut through the Controller, and every snapshot is
 * restored into a new volume and read through its own device.
 *
 *   fresh volume + allocated(snap1) blocks copied from restore(snap1)       == snap1, byte for byte
 *   that copy    + delta(snap1, snap2) blocks copied from restore(snap2)    == snap2, byte for byte
 *
 * and the delta is exact: every block written between the snapshots is in it, and no other block is.
 * The expected bytes come from an in-memory model of every write.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import {
  MiB,
  blockCap,
  dataPlaneSuite,
  directRead,
  directWrite,
  startNodeEnv,
  type NodeEnv,
} from './support/node-env.js';
import { mulberry32 } from '../support/random.js';

const CAPACITY = 64 * MiB;
const BLOCK = 4096;
const WRITES_PER_PHASE = 120;

let env: NodeEnv;
const seed = Number(process.env.CBT_E2E_SEED ?? Date.now() % 2 ** 31);

/** Seeded, so a failure can be replayed with CBT_E2E_SEED. */
const rng = mulberry32;

interface Published {
  volumeId: string;
  staging: string;
  target: string;
}

async function createBlockVolume(name: string, snapshotId?: string): Promise<string> {
  const res = await env.controller.call('createVolume', {
    name,
    capacityRange: { requiredBytes: BigInt(CAPACITY) },
    volumeCapabilities: [blockCap()],
    ...(snapshotId ? { volumeContentSource: { type: { case: 'snapshot' as const, value: { snapshotId } } } } : {}),
  });
  return res.volume!.volumeId;
}

async function stageAndPublish(volumeId: string, name: string): Promise<Published> {
  const staging = env.path('staging', name);
  const target = env.path('pods', name);
  fs.mkdirSync(staging, { recursive: true });
  fs.mkdirSync(env.path('pods'), { recursive: true });
  await env.node.call('nodeStageVolume', { volumeId, stagingTargetPath: staging, volumeCapability: blockCap() });
  await env.node.call('nodePublishVolume', {
    volumeId,
    stagingTargetPath: staging,
    targetPath: target,
    volumeCapability: blockCap(),
  });
  return { volumeId, staging, target };
}

async function release(p: Published): Promise<void> {
  await env.node.call('nodeUnpublishVolume', { volumeId: p.volumeId, targetPath: p.target });
  await env.node.call('nodeUnstageVolume', { volumeId: p.volumeId, stagingTargetPath: p.staging });
}

/** Writes random data at random 512-byte-aligned offsets, into the device and the model; returns the blocks touched. */
function writeRandomly(device: string, model: Buffer, random: () => number): Set<number> {
  const touched = new Set<number>();
  for (let i = 0; i < WRITES_PER_PHASE; i++) {
    // Mostly small writes, some spanning several blocks; sectors, so partial blocks are exercised too.
    const sectors = random() < 0.8 ? 1 + Math.floor(random() * 16) : 1 + Math.floor(random() * 256);
    const length = sectors * 512;
    const offset = Math.floor(random() * ((CAPACITY - length) / 512)) * 512;
    const data = randomBytes(length);
    directWrite(device, offset, data, env.path('scratch'));
    data.copy(model, offset);
    for (let b = Math.floor(offset / BLOCK); b <= Math.floor((offset + length - 1) / BLOCK); b++) touched.add(b);
  }
  return touched;
}

async function snapshot(volumeId: string, name: string): Promise<string> {
  return (await env.controller.call('createSnapshot', { sourceVolumeId: volumeId, name })).snapshot!.snapshotId;
}

type Extent = { offset: number; length: number };

async function allocatedExtents(snapshotId: string): Promise<Extent[]> {
  const messages = await env.metadata.collect('getMetadataAllocated', { snapshotId });
  return messages.flatMap((m) =>
    m.blockMetadata.map((t) => ({ offset: Number(t.byteOffset), length: Number(t.sizeBytes) })),
  );
}

async function deltaExtents(baseSnapshotId: string, targetSnapshotId: string): Promise<Extent[]> {
  const messages = await env.metadata.collect('getMetadataDelta', { baseSnapshotId, targetSnapshotId });
  return messages.flatMap((m) =>
    m.blockMetadata.map((t) => ({ offset: Number(t.byteOffset), length: Number(t.sizeBytes) })),
  );
}

function blocksOf(extents: readonly Extent[]): Set<number> {
  const out = new Set<number>();
  for (const e of extents) for (let b = e.offset / BLOCK; b < (e.offset + e.length) / BLOCK; b++) out.add(b);
  return out;
}

/** Copies extents from a restored snapshot's bytes into the backup volume, through its device. */
function copyExtents(extents: readonly Extent[], from: Buffer, device: string): void {
  for (const e of extents)
    directWrite(device, e.offset, from.subarray(e.offset, e.offset + e.length), env.path('scratch'));
}

const sorted = (s: Set<number>) => [...s].sort((a, b) => a - b);

dataPlaneSuite('block volume end to end: CBT through a real device', () => {
  beforeAll(async () => {
    env = await startNodeEnv();
  }, 60_000);
  afterAll(async () => {
    await env?.cleanup();
  }, 60_000);

  it(`restores and backups built from allocated and delta metadata equal the snapshots byte for byte; the delta is exact (seed ${seed})`, async () => {
    const random = rng(seed);
    const source = await stageAndPublish(await createBlockVolume('source'), 'source');
    const model = Buffer.alloc(CAPACITY);

    const written1 = writeRandomly(source.target, model, random);
    const snap1 = await snapshot(source.volumeId, 'snap-1');
    const model1 = Buffer.from(model);
    const written2 = writeRandomly(source.target, model, random);
    const snap2 = await snapshot(source.volumeId, 'snap-2');
    const model2 = Buffer.from(model);
    // Writes after the last snapshot must not leak into it.
    writeRandomly(source.target, model, random);

    const restore1 = await stageAndPublish(await createBlockVolume('restore-1', snap1), 'restore-1');
    const restore2 = await stageAndPublish(await createBlockVolume('restore-2', snap2), 'restore-2');
    const backup = await stageAndPublish(await createBlockVolume('backup'), 'backup');
    const scratch = env.path('scratch');
    const bytes1 = directRead(restore1.target, CAPACITY, scratch);
    const bytes2 = directRead(restore2.target, CAPACITY, scratch);
    expect(bytes1.equals(model1), 'restore of snapshot 1 reads what was written before it').toBe(true);
    expect(bytes2.equals(model2), 'restore of snapshot 2 reads what was written before it').toBe(true);

    // Full backup: only the allocated blocks of snapshot 1, onto a fresh (zero) volume.
    const allocated = await allocatedExtents(snap1);
    expect(sorted(blocksOf(allocated)), 'allocated(snap1) is exactly the blocks written before it').toEqual(
      sorted(written1),
    );
    copyExtents(allocated, bytes1, backup.target);
    expect(
      directRead(backup.target, CAPACITY, scratch).equals(bytes1),
      'fresh volume + allocated blocks == snapshot 1',
    ).toBe(true);

    // Incremental backup: only the changed blocks between the snapshots.
    const delta = await deltaExtents(snap1, snap2);
    const changed = blocksOf(delta);
    const missed = sorted(written2).filter((b) => !changed.has(b));
    const extra = sorted(changed).filter((b) => !written2.has(b));
    expect(missed, 'every block written between the snapshots is in the delta (no miss)').toEqual([]);
    expect(extra, 'no block left alone between the snapshots is in the delta (exact)').toEqual([]);
    copyExtents(delta, bytes2, backup.target);
    expect(
      directRead(backup.target, CAPACITY, scratch).equals(bytes2),
      'copy of snapshot 1 + delta blocks == snapshot 2',
    ).toBe(true);

    for (const p of [restore1, restore2, backup, source]) await release(p);
  }, 300_000);
});
