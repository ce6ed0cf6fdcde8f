/**
 * Reads, writes and trims at byte granularity over layered volumes. Every test feeds the same
 * operations to the engine and to a plain byte-array model (support/example-support.ts), and the
 * expected bytes, delta and allocated extents come from that model and the design's rules:
 * partial-block writes read the rest of the block from below, whole-block trims are trims and
 * partial trim edges are writes, unwritten space reads as zeros.
 */
import { describe, expect, test } from 'vitest';
import type { BlockStore } from '../../storage-engine/index.js';
import { OutOfRangeError } from '../../storage-engine/errors.js';
import type { ExtentStyle, VolumeInfo } from '../../storage-engine/types.js';
import {
  GiB,
  MiB,
  blocksOfRange,
  collect,
  expectEngineError,
  expectSameBytes,
  extentsOf,
  modelAllocated,
  modelDelta,
  ModelVolume,
  pattern,
  useTempStores,
  type ModelSnap,
} from './support/example-support.js';

const stores = useTempStores();

interface TrackedSnap {
  id: string;
  model: ModelSnap;
}

/** A volume whose every operation is applied to the engine and to the model alike. */
class Tracked {
  constructor(
    readonly store: BlockStore,
    public info: VolumeInfo,
    readonly model: ModelVolume,
  ) {}

  static async create(store: BlockStore, capacityBytes: number, blockSize = 4096): Promise<Tracked> {
    const info = await store.createVolume({ capacityBytes, blockSize });
    return new Tracked(store, info, new ModelVolume(blockSize, capacityBytes));
  }

  get id(): string {
    return this.info.id;
  }
  get blockSize(): number {
    return this.info.blockSize;
  }

  write(offset: number, data: Buffer): void {
    this.store.write(this.id, offset, data);
    this.model.write(offset, data);
  }

  trim(offset: number, length: number): void {
    this.store.trim(this.id, offset, length);
    this.model.trim(offset, length);
  }

  async snapshot(): Promise<TrackedSnap> {
    const info = await this.store.createSnapshot({ volumeId: this.id });
    return { id: info.id, model: this.model.snapshot() };
  }

  expectContent(label: string): void {
    expectSameBytes(this.store.read(this.id, 0, this.model.capacityBytes), this.model.content, label);
  }
}

function expectSnapshotContent(store: BlockStore, snap: TrackedSnap, label: string): void {
  expectSameBytes(store.readSnapshot(snap.id, 0, snap.model.capacityBytes), snap.model.content, label);
}

async function expectDelta(
  store: BlockStore,
  base: TrackedSnap,
  target: TrackedSnap,
  expectedBlocks?: number[],
): Promise<void> {
  const blocks = modelDelta(base.model, target.model);
  if (expectedBlocks) expect(blocks, 'model delta (test premise)').toEqual(expectedBlocks);
  for (const style of ['FIXED', 'VARIABLE'] as ExtentStyle[]) {
    expect(await collect(store.delta(base.id, target.id, { style })), `delta ${style}`).toEqual(
      extentsOf(blocks, target.model.blockSize, style),
    );
  }
}

async function expectAllocated(store: BlockStore, snap: TrackedSnap, expectedBlocks?: number[]): Promise<void> {
  const blocks = modelAllocated(snap.model);
  if (expectedBlocks) expect(blocks, 'model allocated (test premise)').toEqual(expectedBlocks);
  for (const style of ['FIXED', 'VARIABLE'] as ExtentStyle[]) {
    expect(await collect(store.allocated(snap.id, { style })), `allocated ${style}`).toEqual(
      extentsOf(blocks, snap.model.blockSize, style),
    );
  }
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

describe('read-modify-write of partial blocks', () => {
  test.each([4096, 65536, MiB])(
    'a partial write after a snapshot keeps the rest of the block from the snapshot (block size %i)',
    async (B) => {
      const { store } = stores.open({ autoCompact: false });
      const v = await Tracked.create(store, 16 * B, B);
      v.write(0, pattern(1, 4 * B));
      const s1 = await v.snapshot();
      v.write(B + 50, pattern(2, 100));
      v.expectContent('volume');
      // The untouched bytes of block 1 are the snapshot's, not zeros.
      expectSameBytes(store.read(v.id, B, 50), pattern(1, 4 * B).subarray(B, B + 50), 'head of block 1');
      expectSnapshotContent(store, s1, 's1 unchanged');
      const s2 = await v.snapshot();
      await expectDelta(store, s1, s2, [1]);
      await expectAllocated(store, s2, [0, 1, 2, 3]);
    },
  );

  test('the rest of each block comes from the topmost layer holding it, several snapshots down', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 32 * B);
    v.write(7 * B, pattern(1, B));
    const s1 = await v.snapshot();
    v.write(8 * B, pattern(2, B));
    const s2 = await v.snapshot();
    v.write(12 * B, pattern(3, B));
    const s3 = await v.snapshot();
    // Straddles blocks 7 (held by s1's layer) and 8 (held by s2's layer).
    v.write(7 * B + 4000, pattern(4, 200));
    v.expectContent('volume');
    const s4 = await v.snapshot();
    for (const [s, l] of [
      [s1, 's1'],
      [s2, 's2'],
      [s3, 's3'],
      [s4, 's4'],
    ] as Array<[TrackedSnap, string]>) {
      expectSnapshotContent(store, s, l);
    }
    await expectDelta(store, s3, s4, [7, 8]);
    await expectDelta(store, s1, s4, [7, 8, 12]);
    await expectAllocated(store, s4, [7, 8, 12]);
  });

  test('a partial write over a block trimmed below reads zeros around the new bytes', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 8 * B);
    v.write(3 * B, pattern(1, B));
    await v.snapshot();
    v.trim(3 * B, B);
    const s2 = await v.snapshot();
    v.write(3 * B + 10, pattern(2, 20));
    v.expectContent('volume');
    expectSameBytes(store.read(v.id, 3 * B, 10), Buffer.alloc(10), 'bytes before the write');
    const s3 = await v.snapshot();
    await expectAllocated(store, s2, []);
    await expectAllocated(store, s3, [3]);
    await expectDelta(store, s2, s3, [3]);
  });

  test('a partial write to a never-written block reads zeros around it and the block becomes allocated', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 8 * B);
    const s1 = await v.snapshot();
    v.write(5 * B + 1000, pattern(1, 10));
    v.expectContent('volume');
    const s2 = await v.snapshot();
    await expectAllocated(store, s2, [5]);
    await expectDelta(store, s1, s2, [5]);
  });

  test('several partial writes into one block over snapshot data all stay', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 8 * B);
    v.write(0, pattern(1, 8 * B));
    const s1 = await v.snapshot();
    v.write(2 * B + 1, pattern(2, 7));
    v.write(2 * B + 2000, pattern(3, 30));
    v.write(2 * B + 4090, pattern(4, 6));
    v.write(2 * B + 1500, pattern(5, 600)); // overlaps the second write
    v.expectContent('volume');
    const s2 = await v.snapshot();
    expectSnapshotContent(store, s1, 's1');
    expectSnapshotContent(store, s2, 's2');
    await expectDelta(store, s1, s2, [2]);
  });
});

describe('unaligned writes', () => {
  test.each([4096, 65536])(
    'an unaligned write spanning many blocks is byte exact, leaves its neighbours alone and marks exactly the blocks it touches (block size %i)',
    async (B) => {
      const { store } = stores.open({ autoCompact: false });
      const v = await Tracked.create(store, 64 * B, B);
      v.write(0, pattern(1, 64 * B));
      const s1 = await v.snapshot();
      const offset = 3 * B + 1234;
      const length = 20 * B + 77;
      v.write(offset, pattern(2, length));
      v.expectContent('volume');
      expectSameBytes(store.read(v.id, offset, length), pattern(2, length), 'the written range');
      const s2 = await v.snapshot();
      expectSnapshotContent(store, s1, 's1');
      await expectDelta(store, s1, s2, blocksOfRange(offset, length, B));
      expect(await collect(store.delta(s1.id, s2.id, { style: 'VARIABLE' }))).toEqual([
        { offset: 3 * B, length: 21 * B },
      ]);
    },
  );

  test('the last byte of the volume can be written and read alone', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 8 * B);
    const s1 = await v.snapshot();
    v.write(8 * B - 1, Buffer.from([0x5a]));
    expect([...store.read(v.id, 8 * B - 1, 1)]).toEqual([0x5a]);
    v.expectContent('volume');
    const s2 = await v.snapshot();
    await expectDelta(store, s1, s2, [7]);
  });

  test('reads at arbitrary unaligned ranges return exactly the model bytes', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 32 * B);
    v.write(B + 3, pattern(1, 5 * B));
    await v.snapshot();
    v.write(4 * B - 7, pattern(2, 3 * B));
    v.trim(10 * B + 1, 2 * B);
    for (const [offset, length] of [
      [0, 1],
      [B + 2, 3],
      [4 * B - 8, 2],
      [3 * B + 100, 5 * B + 3],
      [10 * B, 3 * B],
      [31 * B + 4095, 1],
    ] as Array<[number, number]>) {
      expectSameBytes(
        store.read(v.id, offset, length),
        v.model.content.subarray(offset, offset + length),
        `read(${offset}, ${length})`,
      );
    }
  });
});

describe('trim', () => {
  test('trim zeroes its range; whole blocks become trimmed (not allocated) while partial edges count as written', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 16 * B);
    v.write(0, pattern(1, 16 * B));
    const s1 = await v.snapshot();
    // [B + 1000, 5B + 1000): block 1 partial, 2..4 whole, 5 partial.
    v.trim(B + 1000, 4 * B);
    v.expectContent('volume');
    expectSameBytes(store.read(v.id, B + 1000, 4 * B), Buffer.alloc(4 * B), 'trimmed range');
    const s2 = await v.snapshot();
    expectSnapshotContent(store, s1, 's1');
    await expectDelta(store, s1, s2, [1, 2, 3, 4, 5]);
    await expectAllocated(store, s2, [0, 1, 5, ...range(6, 16)]);
  });

  test('trimming whole blocks written only in the head reads zeros and leaves them unallocated', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 16 * B);
    v.write(0, pattern(1, 8 * B));
    v.trim(2 * B, 4 * B);
    v.expectContent('volume');
    const s1 = await v.snapshot();
    await expectAllocated(store, s1, [0, 1, 6, 7]);
  });

  test('a trim inside one block zero-fills only those bytes and the block stays allocated', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 8 * B);
    v.write(0, pattern(1, 8 * B));
    const s1 = await v.snapshot();
    v.trim(B + 10, 100);
    v.expectContent('volume');
    expectSameBytes(store.read(v.id, B, 10), pattern(1, 8 * B).subarray(B, B + 10), 'bytes before the trim');
    const s2 = await v.snapshot();
    await expectDelta(store, s1, s2, [1]);
    await expectAllocated(store, s2, range(0, 8));
  });

  test('writing into a trimmed block makes it allocated again, with zeros around the new bytes', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 8 * B);
    v.write(0, pattern(1, 8 * B));
    const s1 = await v.snapshot();
    v.trim(2 * B, B);
    const s2 = await v.snapshot();
    v.write(2 * B + 7, pattern(2, 9));
    v.expectContent('volume');
    const s3 = await v.snapshot();
    await expectAllocated(store, s2, [0, 1, ...range(3, 8)]);
    await expectAllocated(store, s3, range(0, 8));
    await expectDelta(store, s1, s3, [2]);
  });
});

describe('extent queries from a starting offset', () => {
  test('extents start at the block containing startingOffset, cutting a run that spans it', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 32 * B);
    const s0 = await v.snapshot();
    v.write(2 * B, pattern(1, 8 * B)); // blocks 2..9
    v.write(20 * B, pattern(2, B));
    const s1 = await v.snapshot();
    for (const startingOffset of [5 * B, 5 * B + 1, 6 * B - 1]) {
      for (const style of ['FIXED', 'VARIABLE'] as ExtentStyle[]) {
        const expected = extentsOf([...range(5, 10), 20], B, style);
        const label = `${style} from ${startingOffset}`;
        expect(await collect(store.allocated(s1.id, { style, startingOffset })), `allocated ${label}`).toEqual(
          expected,
        );
        expect(await collect(store.delta(s0.id, s1.id, { style, startingOffset })), `delta ${label}`).toEqual(expected);
      }
    }
    expect(await collect(store.allocated(s1.id, { startingOffset: 10 * B }))).toEqual([{ offset: 20 * B, length: B }]);
    expect(await collect(store.allocated(s1.id, { startingOffset: 21 * B - 1 }))).toEqual([
      { offset: 20 * B, length: B },
    ]);
    expect(await collect(store.allocated(s1.id, { startingOffset: 21 * B }))).toEqual([]);
  });

  test('batches hold at most batchSize extents and together list every extent once, in order', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 64 * B);
    // Every other block: 32 one-block runs.
    for (let b = 0; b < 64; b += 2) v.write(b * B, pattern(b, B));
    const s1 = await v.snapshot();
    for (const style of ['FIXED', 'VARIABLE'] as ExtentStyle[]) {
      const batches: number[] = [];
      for await (const batch of store.allocated(s1.id, { style, batchSize: 5 })) batches.push(batch.length);
      expect(batches.every((n) => n <= 5)).toBe(true);
      expect(batches.reduce((a, n) => a + n, 0)).toBe(32);
      expect(await collect(store.allocated(s1.id, { style, batchSize: 5 }), 5)).toEqual(
        extentsOf(modelAllocated(s1.model), B, style),
      );
    }
  });
});

describe('never-written ranges', () => {
  test('a new volume reads zeros everywhere and its snapshot has nothing allocated', async () => {
    const { store } = stores.open({ autoCompact: false });
    const v = await store.createVolume({ capacityBytes: GiB });
    for (const [offset, length] of [
      [0, MiB],
      [512 * MiB + 7, 100_000],
      [GiB - 100, 100],
    ] as Array<[number, number]>) {
      expectSameBytes(store.read(v.id, offset, length), Buffer.alloc(length), `read(${offset}, ${length})`);
    }
    const s = await store.createSnapshot({ volumeId: v.id });
    expect(await collect(store.allocated(s.id))).toEqual([]);
    expectSameBytes(store.readSnapshot(s.id, GiB - MiB, MiB), Buffer.alloc(MiB), 'snapshot tail');
  });

  test('unwritten blocks around written ones read zeros, also through snapshots', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 64 * B);
    v.write(10 * B + 100, pattern(1, 300));
    const s1 = await v.snapshot();
    v.write(40 * B, pattern(2, B));
    expectSameBytes(store.read(v.id, 9 * B, 3 * B), v.model.content.subarray(9 * B, 12 * B), 'around block 10');
    expectSameBytes(store.read(v.id, 11 * B, 29 * B), Buffer.alloc(29 * B), 'between the writes');
    v.expectContent('volume');
    expectSnapshotContent(store, s1, 's1');
  });
});

describe('grow', () => {
  test('growing adds zeros, the new range is writable, and snapshots keep their own capacity', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 16 * B);
    v.write(15 * B, pattern(1, B));
    const s1 = await v.snapshot();
    v.info = await store.growVolume(v.id, 64 * B);
    v.model.grow(64 * B);
    expect(v.info.capacityBytes).toBe(64 * B);
    expectSameBytes(store.read(v.id, 16 * B, 48 * B), Buffer.alloc(48 * B), 'new range');
    v.write(40 * B + 7, pattern(2, B));
    v.expectContent('volume');
    const s2 = await v.snapshot();

    expect(store.getSnapshot(s1.id).capacityBytes).toBe(16 * B);
    expect(store.getSnapshot(s2.id).capacityBytes).toBe(64 * B);
    await expectEngineError(() => store.readSnapshot(s1.id, 16 * B, 1), OutOfRangeError, 'OUT_OF_RANGE');
    expectSnapshotContent(store, s1, 's1');
    expectSnapshotContent(store, s2, 's2');
    await expectDelta(store, s1, s2, [40, 41]);
    await expectAllocated(store, s2, [15, 40, 41]);

    const delta = store.delta(s1.id, s2.id, { style: 'FIXED' });
    expect({ capacityBytes: delta.capacityBytes, blockSize: delta.blockSize, style: delta.style }).toEqual({
      capacityBytes: 64 * B,
      blockSize: B,
      style: 'FIXED',
    });
    const alloc = store.allocated(s1.id);
    expect({ capacityBytes: alloc.capacityBytes, style: alloc.style }).toEqual({
      capacityBytes: 16 * B,
      style: 'VARIABLE',
    });
  });
});

describe('persistence', () => {
  test('flushed data, snapshots and their extents survive close and reopen', async () => {
    const { store, dir } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 64 * B);
    v.write(100, pattern(1, 10 * B));
    const s1 = await v.snapshot();
    v.write(5 * B + 3, pattern(2, 2 * B));
    v.trim(20 * B, 2 * B);
    await store.flush(v.id);
    await store.close();

    const reopened = stores.reopen(dir, { autoCompact: false });
    const again = new Tracked(reopened, reopened.getVolume(v.id), v.model);
    again.expectContent('volume after reopen');
    expectSnapshotContent(reopened, s1, 's1 after reopen');
    // Read-modify-write still finds the lower layers after reopening.
    again.write(3 * B + 1, pattern(3, 5));
    again.expectContent('volume after a partial write post-reopen');
    const s2 = await again.snapshot();
    await expectDelta(reopened, s1, s2);
    await expectAllocated(reopened, s2);
  });

  test('close flushes writes that were never explicitly flushed', async () => {
    const { store, dir } = stores.open({ autoCompact: false });
    const v = await Tracked.create(store, MiB);
    v.write(12345, pattern(1, 100_000));
    await store.close();
    const reopened = stores.reopen(dir, { autoCompact: false });
    expectSameBytes(reopened.read(v.id, 0, MiB), v.model.content, 'volume after reopen');
  });
});

describe('clones', () => {
  test('a clone of a snapshot reads the snapshot, and clone and source diverge independently', async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 32 * B);
    v.write(0, pattern(1, 16 * B));
    const s1 = await v.snapshot();
    v.write(2 * B, pattern(2, 3 * B)); // after s1: the clone must not see it

    const info = await store.createVolume({ sourceSnapshotId: s1.id, capacityBytes: 48 * B });
    expect(info.source).toEqual({ kind: 'snapshot', snapshotId: s1.id });
    expect(info.blockSize).toBe(B);
    const c = new Tracked(store, info, ModelVolume.cloneOf(s1.model, 48 * B));
    c.expectContent('clone as created');

    c.write(B + 5, pattern(3, 2 * B));
    c.write(40 * B, pattern(4, B));
    v.write(10 * B + 9, pattern(5, 100));
    c.expectContent('clone after both diverged');
    v.expectContent('source after both diverged');
    expectSnapshotContent(store, s1, 's1');

    const c1 = await c.snapshot();
    await expectDelta(store, s1, c1, [1, 2, 3, 40]);
    await expectAllocated(store, c1, [...range(0, 16), 40]);
    const v2 = await v.snapshot();
    await expectDelta(store, s1, v2, [2, 3, 4, 10]);
  });

  test("a clone of a volume reads the volume's current content, unflushed writes included, and they diverge independently", async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 32 * B);
    v.write(0, pattern(1, 8 * B));
    const s1 = await v.snapshot();
    v.write(4 * B + 11, pattern(2, 3 * B)); // unflushed at clone time

    const info = await store.createVolume({ sourceVolumeId: v.id, capacityBytes: 32 * B });
    expect(info.source).toEqual({ kind: 'volume', volumeId: v.id });
    const c = new Tracked(store, info, v.model.cloneVolume());
    c.expectContent('clone as created');

    c.write(0, pattern(3, 100));
    v.write(20 * B, pattern(4, B));
    c.expectContent('clone after both diverged');
    v.expectContent('source after both diverged');

    // The source's next snapshot covers its writes from before and after the clone.
    const s2 = await v.snapshot();
    await expectDelta(store, s1, s2, [4, 5, 6, 7, 20]);
    const c1 = await c.snapshot();
    await expectDelta(store, s1, c1, [0, 4, 5, 6, 7]);
    expectSnapshotContent(store, c1, 'c1');

    // The clone does not depend on its source volume staying around.
    await store.deleteVolume(v.id);
    c.expectContent('clone after the source volume was deleted');
    expectSnapshotContent(store, s2, 's2 after its volume was deleted');
  });

  test("a clone of a clone's snapshot reads and tracks through all three chains", async () => {
    const { store } = stores.open({ autoCompact: false });
    const B = 4096;
    const v = await Tracked.create(store, 16 * B);
    v.write(0, pattern(1, 4 * B));
    const s1 = await v.snapshot();
    const c = new Tracked(
      store,
      await store.createVolume({ sourceSnapshotId: s1.id, capacityBytes: 16 * B }),
      ModelVolume.cloneOf(s1.model),
    );
    c.write(6 * B + 1, pattern(2, 10));
    const c1 = await c.snapshot();
    const d = new Tracked(
      store,
      await store.createVolume({ sourceSnapshotId: c1.id, capacityBytes: 16 * B }),
      ModelVolume.cloneOf(c1.model),
    );
    d.write(9 * B, pattern(3, 2 * B));
    d.expectContent('second-generation clone');
    const d1 = await d.snapshot();
    await expectDelta(store, s1, d1, [6, 9, 10]);
    await expectDelta(store, c1, d1, [9, 10]);
    await expectAllocated(store, d1, [0, 1, 2, 3, 6, 9, 10]);
  });
});
