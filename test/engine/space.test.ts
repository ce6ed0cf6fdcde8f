/**
 * Space accounting: capacity is virtual (layer files are sparse, only written blocks take disk), a
 * snapshot or a clone freezes or shares layers instead of copying data, writes after a snapshot cost
 * only the blocks written, and compaction gives back the space of data nothing can read any more.
 */
import * as path from 'node:path';
import { describe, expect, test } from 'vitest';
import type { BlockStore } from '../../storage-engine/index.js';
import { GiB, KiB, MiB, TiB, diskUsage, expectSameBytes, pattern, useTempStores } from './support/example-support.js';

const stores = useTempStores();
const B = 4096;

/** Layer-file bytes really allocated on disk, as the file system reports them. */
function layerDiskUsage(dir: string): number {
  return diskUsage(path.join(dir, 'layers'));
}

/** Ten 1 MiB chunks spread over a 1 TiB volume, one per ~100 GiB, each starting mid-block. */
const CHUNKS = Array.from({ length: 10 }, (_, k) => ({ offset: k * 100 * GiB + k * 3 * B + 512, seed: k + 1 }));

async function tenMiBOnOneTiB(store: BlockStore): Promise<string> {
  const v = await store.createVolume({ capacityBytes: TiB, blockSize: B });
  for (const c of CHUNKS) store.write(v.id, c.offset, pattern(c.seed, MiB));
  await store.flush(v.id);
  return v.id;
}

describe('capacity is virtual', () => {
  test('a 1 TiB volume with 10 MiB written takes about 10 MiB, by the store and by the file system', async () => {
    const { store, dir } = stores.open({ autoCompact: false });
    const id = await tenMiBOnOneTiB(store);
    const usage = store.spaceUsage();
    expect(usage.provisionedBytes).toBe(TiB);
    // Each unaligned chunk touches 257 blocks.
    expect(usage.layerBytes).toBeGreaterThanOrEqual(10 * MiB);
    expect(usage.layerBytes).toBeLessThanOrEqual(12 * MiB);
    expect(layerDiskUsage(dir)).toBeGreaterThanOrEqual(10 * MiB);
    expect(layerDiskUsage(dir)).toBeLessThanOrEqual(12 * MiB);
    // The whole directory, catalog included, stays in the same range.
    expect(diskUsage(dir)).toBeLessThanOrEqual(16 * MiB);
    for (const c of CHUNKS) expectSameBytes(store.read(id, c.offset, MiB), pattern(c.seed, MiB), `chunk ${c.seed}`);
  });

  test('provisioned bytes sum the volumes capacities while nothing written takes no layer space', async () => {
    const { store, dir } = stores.open({ autoCompact: false });
    await store.createVolume({ capacityBytes: TiB });
    await store.createVolume({ capacityBytes: 512 * GiB, blockSize: 65536 });
    const usage = store.spaceUsage();
    expect(usage.provisionedBytes).toBe(TiB + 512 * GiB);
    expect(usage.volumes).toBe(2);
    expect(usage.layerBytes).toBeLessThanOrEqual(64 * KiB);
    expect(layerDiskUsage(dir)).toBeLessThanOrEqual(64 * KiB);
  });
});

describe('snapshots and clones share instead of copying', () => {
  test('snapshots with no new writes add about zero bytes', async () => {
    const { store, dir } = stores.open({ autoCompact: false });
    const id = await tenMiBOnOneTiB(store);
    const before = store.spaceUsage().layerBytes;
    const diskBefore = layerDiskUsage(dir);
    for (let i = 0; i < 5; i++) await store.createSnapshot({ volumeId: id });
    expect(store.spaceUsage().snapshots).toBe(5);
    expect(store.spaceUsage().layerBytes - before).toBeLessThanOrEqual(64 * KiB);
    expect(layerDiskUsage(dir) - diskBefore).toBeLessThanOrEqual(64 * KiB);
  });

  test("a clone of a snapshot adds about zero bytes and reads the snapshot's data", async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await tenMiBOnOneTiB(store);
    const snap = await store.createSnapshot({ volumeId: id });
    const before = store.spaceUsage().layerBytes;
    const clone = await store.createVolume({ sourceSnapshotId: snap.id, capacityBytes: TiB });
    await store.flush(clone.id);
    expect(store.spaceUsage().layerBytes - before).toBeLessThanOrEqual(64 * KiB);
    const c = CHUNKS[3];
    if (!c) throw new Error('no chunk');
    expectSameBytes(store.read(clone.id, c.offset, MiB), pattern(c.seed, MiB), 'clone content');
  });

  test('writing after a snapshot costs the blocks written, whole blocks for partial writes', async () => {
    const { store } = stores.open({ autoCompact: false });
    const id = await tenMiBOnOneTiB(store);
    await store.createSnapshot({ volumeId: id });
    const base = store.spaceUsage().layerBytes;

    // 1 MiB, block aligned, mostly over data the snapshot holds: 256 new blocks in the head.
    store.write(id, 200 * GiB, pattern(77, MiB));
    await store.flush(id);
    const afterMiB = store.spaceUsage().layerBytes;
    expect(afterMiB - base).toBeGreaterThanOrEqual(MiB);
    expect(afterMiB - base).toBeLessThanOrEqual(MiB + 64 * KiB);

    // One byte inside a block the snapshot holds: the head gets that one block (read-modify-write).
    const c = CHUNKS[5];
    if (!c) throw new Error('no chunk');
    store.write(id, c.offset + 10 * B + 3, Buffer.from([0xab]));
    await store.flush(id);
    const afterByte = store.spaceUsage().layerBytes;
    expect(afterByte - afterMiB).toBeGreaterThanOrEqual(B);
    expect(afterByte - afterMiB).toBeLessThanOrEqual(4 * B);
  });
});

describe('compaction reclaims data nothing can read', () => {
  test('deleting the snapshots of overwritten data and compacting leaves only the live copy', async () => {
    const { store, dir } = stores.open({ autoCompact: false });
    const v = await store.createVolume({ capacityBytes: 64 * MiB, blockSize: B });
    store.write(v.id, 8 * MiB, pattern(1, 4 * MiB));
    const s1 = await store.createSnapshot({ volumeId: v.id });
    store.write(v.id, 8 * MiB, pattern(2, 4 * MiB));
    const s2 = await store.createSnapshot({ volumeId: v.id });
    store.write(v.id, 8 * MiB, pattern(3, 4 * MiB));
    await store.flush(v.id);
    const full = store.spaceUsage().layerBytes;
    expect(full).toBeGreaterThanOrEqual(12 * MiB);
    expect(full).toBeLessThanOrEqual(13 * MiB);

    await store.deleteSnapshot(s1.id);
    await store.deleteSnapshot(s2.id);
    await store.compact();
    const usage = store.spaceUsage();
    expect(usage.hiddenLayers).toBe(0);
    expect(usage.layerBytes).toBeGreaterThanOrEqual(4 * MiB);
    expect(usage.layerBytes).toBeLessThanOrEqual(4 * MiB + 256 * KiB);
    expect(layerDiskUsage(dir)).toBeLessThanOrEqual(4 * MiB + 256 * KiB);
    expectSameBytes(store.read(v.id, 8 * MiB, 4 * MiB), pattern(3, 4 * MiB), 'live content');
  });

  test('a snapshot kept in the middle keeps its own data and only the older overwritten copy is reclaimed', async () => {
    const { store } = stores.open({ autoCompact: false });
    const v = await store.createVolume({ capacityBytes: 64 * MiB, blockSize: B });
    store.write(v.id, 0, pattern(1, 4 * MiB));
    const s1 = await store.createSnapshot({ volumeId: v.id });
    store.write(v.id, 0, pattern(2, 4 * MiB));
    const s2 = await store.createSnapshot({ volumeId: v.id });
    store.write(v.id, 0, pattern(3, 4 * MiB));
    await store.flush(v.id);

    await store.deleteSnapshot(s1.id);
    await store.compact();
    const usage = store.spaceUsage().layerBytes;
    expect(usage).toBeGreaterThanOrEqual(8 * MiB);
    expect(usage).toBeLessThanOrEqual(8 * MiB + 256 * KiB);
    expectSameBytes(store.readSnapshot(s2.id, 0, 4 * MiB), pattern(2, 4 * MiB), 'kept snapshot');
  });

  test('trimming data after a snapshot, then deleting the snapshot and compacting, frees the trimmed data', async () => {
    const { store } = stores.open({ autoCompact: false });
    const v = await store.createVolume({ capacityBytes: 64 * MiB, blockSize: B });
    store.write(v.id, 0, pattern(1, 4 * MiB));
    const s1 = await store.createSnapshot({ volumeId: v.id });
    store.trim(v.id, 0, 4 * MiB);
    await store.flush(v.id);
    expect(store.spaceUsage().layerBytes).toBeGreaterThanOrEqual(4 * MiB);

    await store.deleteSnapshot(s1.id);
    await store.compact();
    expect(store.spaceUsage().layerBytes).toBeLessThanOrEqual(64 * KiB);
    expectSameBytes(store.read(v.id, 0, 4 * MiB), Buffer.alloc(4 * MiB), 'trimmed range');
  });
});
