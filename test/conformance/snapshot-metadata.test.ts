/**
 * CSI SnapshotMetadata service (spec v1.12.0: "Snapshot Metadata Service RPCs", "Special considerations
 * for processing a snapshot metadata gRPC stream", GetMetadataAllocated, GetMetadataDelta and their
 * error tables), checked over the driver's unix socket with an independent gRPC client.
 *
 * Volumes and snapshots are made directly in the running driver's block store; every write and trim is
 * also applied to a small block model here, and the expected allocated and changed blocks come from
 * that model, never from the driver.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { status, type ClientReadableStream } from '@grpc/grpc-js';
import type { DestinationStream } from 'pino';
import { BlockMetadataType } from '../../src/gen/csi/v1/csi_pb.js';
import { createLogger } from '../../src/logging.js';
import { startDriver, type RunningDriver } from '../../src/server.js';
import type { BlockStore } from '../../storage-engine/index.js';
import { codeOf, ServiceClient } from '../support/csi-client.js';
import { startTestDriver, testConfig, type TestDriver } from '../support/test-driver.js';
import { Identity, SnapshotMetadata } from '../../src/gen/csi/v1/csi_pb.js';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The driver under test is configured with this default for max_results = 0. */
const DEFAULT_MAX_RESULTS = 100;

type Style = 'FIXED' | 'VARIABLE';

/** A response as both RPCs return it (the two response types have the same fields). */
interface MetadataMessage {
  blockMetadataType: BlockMetadataType;
  volumeCapacityBytes: bigint;
  blockMetadata: { byteOffset: bigint; sizeBytes: bigint }[];
}

interface Tuple {
  offset: number;
  length: number;
}

// ------------------------------------------------------------------ model

/** What a snapshot holds according to the model. */
interface ModelSnapshot {
  id: string;
  blockSize: number;
  capacityBytes: number;
  /** Blocks whose latest operation was a write. */
  allocated: ReadonlySet<number>;
  /** The snapshot it follows on the same history (previous snapshot of the volume, or the clone's source). */
  parent: ModelSnapshot | undefined;
  /** Blocks written or trimmed between `parent` (or the volume's creation) and this snapshot. */
  changed: ReadonlySet<number>;
}

/** A volume in the driver's store, mirrored by a model of which blocks are allocated and which changed. */
class ModelVolume {
  private readonly allocated: Set<number>;
  private changed = new Set<number>();
  private last: ModelSnapshot | undefined;
  private seed = 1;

  private constructor(
    private readonly store: BlockStore,
    readonly id: string,
    readonly blockSize: number,
    public capacityBytes: number,
    readonly style: Style | undefined,
    from: ModelSnapshot | undefined,
  ) {
    this.allocated = new Set(from?.allocated ?? []);
    this.last = from;
  }

  /** A new empty volume; `style` is recorded the way the controller records a StorageClass's metadataStyle. */
  static async create(
    store: BlockStore,
    opts: { blocks: number; blockSize?: number; style?: Style },
  ): Promise<ModelVolume> {
    const blockSize = opts.blockSize ?? 4 * KiB;
    const info = await store.createVolume({
      capacityBytes: opts.blocks * blockSize,
      blockSize,
      attributes: opts.style ? { metadataStyle: opts.style } : {},
    });
    return new ModelVolume(store, info.id, blockSize, info.capacityBytes, opts.style, undefined);
  }

  /** A new volume cloned from a snapshot; it starts with the snapshot's content and no changes. */
  static async cloneOf(store: BlockStore, source: ModelSnapshot, style: Style | undefined, capacityBytes?: number) {
    const info = await store.createVolume({
      sourceSnapshotId: source.id,
      capacityBytes: capacityBytes ?? source.capacityBytes,
      blockSize: source.blockSize,
      attributes: style ? { metadataStyle: style } : {},
    });
    return new ModelVolume(store, info.id, source.blockSize, info.capacityBytes, style, source);
  }

  /** Writes `length` bytes at a byte offset (need not be block aligned): every block touched is written. */
  write(offset: number, length: number): void {
    const data = Buffer.alloc(length);
    for (let i = 0; i < length; i++) data[i] = (this.seed * 31 + i * 7 + 1) & 0xff || 1;
    this.seed++;
    this.store.write(this.id, offset, data);
    for (const b of touchedBlocks(offset, length, this.blockSize)) {
      this.allocated.add(b);
      this.changed.add(b);
    }
  }

  writeBlocks(blocks: Iterable<number>): void {
    for (const b of blocks) this.write(b * this.blockSize, this.blockSize);
  }

  /** Trims whole blocks: they read as zeros, are no longer allocated, and count as changed. */
  trimBlocks(first: number, count: number): void {
    this.store.trim(this.id, first * this.blockSize, count * this.blockSize);
    for (let b = first; b < first + count; b++) {
      this.allocated.delete(b);
      this.changed.add(b);
    }
  }

  async grow(capacityBytes: number): Promise<void> {
    const info = await this.store.growVolume(this.id, capacityBytes);
    this.capacityBytes = info.capacityBytes;
  }

  /** Takes a snapshot, recording the volume's style in its attributes as CreateSnapshot does. */
  async snapshot(): Promise<ModelSnapshot> {
    const info = await this.store.createSnapshot({
      volumeId: this.id,
      attributes: this.style ? { metadataStyle: this.style } : {},
    });
    const snap: ModelSnapshot = {
      id: info.id,
      blockSize: this.blockSize,
      capacityBytes: this.capacityBytes,
      allocated: new Set(this.allocated),
      parent: this.last,
      changed: this.changed,
    };
    this.changed = new Set();
    this.last = snap;
    return snap;
  }
}

function touchedBlocks(offset: number, length: number, blockSize: number): number[] {
  const out: number[] = [];
  for (let b = Math.floor(offset / blockSize); b <= Math.floor((offset + length - 1) / blockSize); b++) out.push(b);
  return out;
}

/** Blocks changed after `base` up to and including `target`, following target's history back to base. */
function modelDelta(base: ModelSnapshot, target: ModelSnapshot): Set<number> {
  const out = new Set<number>();
  for (let s: ModelSnapshot | undefined = target; s !== base; s = s.parent) {
    if (!s) throw new Error('model: base is not in the target history');
    for (const b of s.changed) out.add(b);
  }
  return out;
}

/** One tuple a block (FIXED_LENGTH). */
function fixedTuples(blocks: Iterable<number>, blockSize: number): Tuple[] {
  return [...blocks].sort((a, b) => a - b).map((b) => ({ offset: b * blockSize, length: blockSize }));
}

/** Maximal runs of adjacent blocks (VARIABLE_LENGTH as the design defines it). */
function runTuples(blocks: Iterable<number>, blockSize: number): Tuple[] {
  const sorted = [...blocks].sort((a, b) => a - b);
  const out: Tuple[] = [];
  for (const b of sorted) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === b * blockSize) last.length += blockSize;
    else out.push({ offset: b * blockSize, length: blockSize });
  }
  return out;
}

function expectedTuples(blocks: Iterable<number>, blockSize: number, style: Style): Tuple[] {
  return style === 'FIXED' ? fixedTuples(blocks, blockSize) : runTuples(blocks, blockSize);
}

/** The blocks a list of tuples covers. */
function coveredBlocks(tuples: Tuple[], blockSize: number): number[] {
  const out: number[] = [];
  for (const t of tuples) for (let o = t.offset; o < t.offset + t.length; o += blockSize) out.push(o / blockSize);
  return out;
}

/** Blocks of `set` that end after byte S: what a stream started at S must still report. */
function blocksEndingAfter(set: Iterable<number>, blockSize: number, s: number): number[] {
  return [...set].filter((b) => (b + 1) * blockSize > s).sort((a, b) => a - b);
}

function tuplesOf(messages: MetadataMessage[]): Tuple[] {
  return messages.flatMap((m) =>
    m.blockMetadata.map((t) => ({ offset: Number(t.byteOffset), length: Number(t.sizeBytes) })),
  );
}

/** Spec "Metadata Format" + response docs: ascending, non-overlapping across the whole stream, sizes > 0. */
function expectOrderedAndDisjoint(tuples: Tuple[]): void {
  for (const [i, t] of tuples.entries()) {
    expect(t.length, `tuple ${i} size_bytes`).toBeGreaterThan(0);
    const prev = tuples[i - 1];
    if (prev)
      expect(prev.offset + prev.length, `tuple ${i - 1} ends after tuple ${i} starts`).toBeLessThanOrEqual(t.offset);
  }
}

const STYLE_CODE: Record<Style, BlockMetadataType> = {
  FIXED: BlockMetadataType.FIXED_LENGTH,
  VARIABLE: BlockMetadataType.VARIABLE_LENGTH,
};

/** Reads the first message of a stream (undefined if it ends without one), then cancels it: an interrupted stream, as the CO sees one. */
async function firstMessageThenCancel<T>(call: ClientReadableStream<T>): Promise<T | undefined> {
  const first = await new Promise<T | undefined>((resolve, reject) => {
    call.once('data', resolve);
    call.once('error', reject);
    call.once('end', () => resolve(undefined));
  });
  call.on('error', () => undefined); // the CANCELLED status that follows our own cancel
  call.cancel();
  return first;
}

// ------------------------------------------------------------------ driver

let d: TestDriver;
let store: BlockStore;

beforeAll(async () => {
  d = await startTestDriver({ defaultMaxResults: DEFAULT_MAX_RESULTS, defaultMetadataStyle: 'VARIABLE' });
  store = d.driver.store;
});
afterAll(async () => {
  await d?.stop();
});

const allocated = (req: {
  snapshotId: string;
  startingOffset?: bigint;
  maxResults?: number;
  secrets?: Record<string, string>;
}) => d.metadata.collect('getMetadataAllocated', req) as Promise<MetadataMessage[]>;
const delta = (req: {
  baseSnapshotId: string;
  targetSnapshotId: string;
  startingOffset?: bigint;
  maxResults?: number;
}) => d.metadata.collect('getMetadataDelta', req) as Promise<MetadataMessage[]>;

/** A volume with two snapshots and some changes between them, for the error-table tests. */
async function pairOfSnapshots(): Promise<{ vol: ModelVolume; base: ModelSnapshot; target: ModelSnapshot }> {
  const vol = await ModelVolume.create(store, { blocks: 64, style: 'FIXED' });
  vol.writeBlocks([1, 2, 3]);
  const base = await vol.snapshot();
  vol.writeBlocks([2, 40]);
  const target = await vol.snapshot();
  return { vol, base, target };
}

// ------------------------------------------------------------------ error tables

describe('GetMetadataAllocated errors', () => {
  let snap: ModelSnapshot;
  beforeAll(async () => {
    snap = (await pairOfSnapshots()).target;
  });

  test('GetMetadataAllocated: a missing snapshot_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(allocated({ snapshotId: '' }))).toBe(status.INVALID_ARGUMENT);
  });

  test('GetMetadataAllocated: a negative max_results is INVALID_ARGUMENT', async () => {
    expect(await codeOf(allocated({ snapshotId: snap.id, maxResults: -1 }))).toBe(status.INVALID_ARGUMENT);
    expect(await codeOf(allocated({ snapshotId: snap.id, maxResults: -(2 ** 31) }))).toBe(status.INVALID_ARGUMENT);
  });

  test('GetMetadataAllocated: an unknown snapshot_id is NOT_FOUND', async () => {
    expect(await codeOf(allocated({ snapshotId: 'snap-0000000000000000' }))).toBe(status.NOT_FOUND);
  });

  test('GetMetadataAllocated: a malformed snapshot_id is NOT_FOUND (never interpreted as a path)', async () => {
    for (const id of ['../../etc/passwd', 'snap-', 'x'.repeat(4096), `${snap.id}/..`, ` ${snap.id}`]) {
      expect(await codeOf(allocated({ snapshotId: id })), id.slice(0, 40)).toBe(status.NOT_FOUND);
    }
  });

  test('GetMetadataAllocated: a volume ID given as snapshot_id is NOT_FOUND', async () => {
    const vol = await ModelVolume.create(store, { blocks: 4 });
    expect(await codeOf(allocated({ snapshotId: vol.id }))).toBe(status.NOT_FOUND);
  });

  test('GetMetadataAllocated: a deleted snapshot is NOT_FOUND', async () => {
    const vol = await ModelVolume.create(store, { blocks: 4 });
    const s = await vol.snapshot();
    await store.deleteSnapshot(s.id);
    expect(await codeOf(allocated({ snapshotId: s.id }))).toBe(status.NOT_FOUND);
  });

  test('GetMetadataAllocated: a negative starting_offset is OUT_OF_RANGE', async () => {
    expect(await codeOf(allocated({ snapshotId: snap.id, startingOffset: -1n }))).toBe(status.OUT_OF_RANGE);
    expect(await codeOf(allocated({ snapshotId: snap.id, startingOffset: -(2n ** 63n) }))).toBe(status.OUT_OF_RANGE);
  });

  test('GetMetadataAllocated: a starting_offset beyond the volume size is OUT_OF_RANGE', async () => {
    const cap = BigInt(snap.capacityBytes);
    expect(await codeOf(allocated({ snapshotId: snap.id, startingOffset: cap + 1n }))).toBe(status.OUT_OF_RANGE);
    expect(await codeOf(allocated({ snapshotId: snap.id, startingOffset: 2n ** 63n - 1n }))).toBe(status.OUT_OF_RANGE);
  });

  test('GetMetadataAllocated: a starting_offset equal to the volume size is valid and reports nothing', async () => {
    const messages = await allocated({ snapshotId: snap.id, startingOffset: BigInt(snap.capacityBytes) });
    expect(tuplesOf(messages)).toEqual([]);
  });
});

describe('GetMetadataDelta errors', () => {
  let base: ModelSnapshot;
  let target: ModelSnapshot;
  beforeAll(async () => {
    ({ base, target } = await pairOfSnapshots());
  });

  test('GetMetadataDelta: a missing base_snapshot_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(delta({ baseSnapshotId: '', targetSnapshotId: target.id }))).toBe(status.INVALID_ARGUMENT);
  });

  test('GetMetadataDelta: a missing target_snapshot_id is INVALID_ARGUMENT', async () => {
    expect(await codeOf(delta({ baseSnapshotId: base.id, targetSnapshotId: '' }))).toBe(status.INVALID_ARGUMENT);
  });

  test('GetMetadataDelta: a negative max_results is INVALID_ARGUMENT', async () => {
    expect(await codeOf(delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, maxResults: -5 }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('GetMetadataDelta: an unknown base_snapshot_id is NOT_FOUND', async () => {
    expect(await codeOf(delta({ baseSnapshotId: 'snap-0000000000000000', targetSnapshotId: target.id }))).toBe(
      status.NOT_FOUND,
    );
  });

  test('GetMetadataDelta: an unknown target_snapshot_id is NOT_FOUND', async () => {
    expect(await codeOf(delta({ baseSnapshotId: base.id, targetSnapshotId: 'snap-ffffffffffffffff' }))).toBe(
      status.NOT_FOUND,
    );
  });

  test('GetMetadataDelta: malformed snapshot IDs are NOT_FOUND (never interpreted as a path)', async () => {
    expect(await codeOf(delta({ baseSnapshotId: '../../catalog.db', targetSnapshotId: target.id }))).toBe(
      status.NOT_FOUND,
    );
    expect(await codeOf(delta({ baseSnapshotId: base.id, targetSnapshotId: '/etc/passwd' }))).toBe(status.NOT_FOUND);
  });

  test('GetMetadataDelta: a deleted base snapshot answers from its change record, exactly (invariant 8)', async () => {
    const vol = await ModelVolume.create(store, { blocks: 8, style: 'FIXED' });
    const s1 = await vol.snapshot();
    vol.writeBlocks([1, 5]);
    const s2 = await vol.snapshot();
    await store.deleteSnapshot(s1.id);
    await store.compact();
    const tuples = tuplesOf(await delta({ baseSnapshotId: s1.id, targetSnapshotId: s2.id }));
    expect(tuples.map((t) => t.offset / vol.blockSize)).toEqual([1, 5]);
  });

  test('GetMetadataDelta: a base that never existed is NOT_FOUND', async () => {
    const vol = await ModelVolume.create(store, { blocks: 8 });
    const s2 = await vol.snapshot();
    expect(await codeOf(delta({ baseSnapshotId: 'snap-0123456789abcdef', targetSnapshotId: s2.id }))).toBe(
      status.NOT_FOUND,
    );
  });

  test('GetMetadataDelta: a negative starting_offset is OUT_OF_RANGE', async () => {
    expect(await codeOf(delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, startingOffset: -4096n }))).toBe(
      status.OUT_OF_RANGE,
    );
  });

  test('GetMetadataDelta: a starting_offset beyond the volume size is OUT_OF_RANGE', async () => {
    const beyond = BigInt(target.capacityBytes) + 1n;
    expect(await codeOf(delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, startingOffset: beyond }))).toBe(
      status.OUT_OF_RANGE,
    );
  });

  test('GetMetadataDelta: a starting_offset equal to the volume size is valid and reports nothing', async () => {
    const at = BigInt(target.capacityBytes);
    const messages = await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, startingOffset: at });
    expect(tuplesOf(messages)).toEqual([]);
  });

  test('GetMetadataDelta: snapshots of two unrelated volumes are INVALID_ARGUMENT', async () => {
    const other = await ModelVolume.create(store, { blocks: 64, style: 'FIXED' });
    other.writeBlocks([1]);
    const foreign = await other.snapshot();
    expect(await codeOf(delta({ baseSnapshotId: foreign.id, targetSnapshotId: target.id }))).toBe(
      status.INVALID_ARGUMENT,
    );
    expect(await codeOf(delta({ baseSnapshotId: base.id, targetSnapshotId: foreign.id }))).toBe(
      status.INVALID_ARGUMENT,
    );
  });

  test('GetMetadataDelta: a base snapshot taken after the target is INVALID_ARGUMENT', async () => {
    expect(await codeOf(delta({ baseSnapshotId: target.id, targetSnapshotId: base.id }))).toBe(status.INVALID_ARGUMENT);
  });
});

// ------------------------------------------------------------------ content

describe('GetMetadataAllocated content', () => {
  test('GetMetadataAllocated: reports exactly the blocks written (FIXED_LENGTH, one tuple a block)', async () => {
    const vol = await ModelVolume.create(store, { blocks: 256, style: 'FIXED' });
    vol.writeBlocks([0, 1, 2, 7, 100, 101, 255]);
    vol.write(50 * 4096 + 100, 10); // inside one block
    vol.write(60 * 4096 - 10, 20); // across a block boundary: both blocks
    const snap = await vol.snapshot();
    const tuples = tuplesOf(await allocated({ snapshotId: snap.id }));
    expect(tuples).toEqual(fixedTuples(snap.allocated, 4096));
  });

  test('GetMetadataAllocated: reports exactly the blocks written (VARIABLE_LENGTH, adjacent blocks merged)', async () => {
    const vol = await ModelVolume.create(store, { blocks: 256, style: 'VARIABLE' });
    vol.writeBlocks([0, 1, 2, 7, 100, 101, 255]);
    vol.write(10 * 4096, 30 * 4096); // one long write: blocks 10..39
    const snap = await vol.snapshot();
    const tuples = tuplesOf(await allocated({ snapshotId: snap.id }));
    expect(coveredBlocks(tuples, 4096)).toEqual([...snap.allocated].sort((a, b) => a - b));
    expect(tuples).toEqual(runTuples(snap.allocated, 4096));
  });

  test('GetMetadataAllocated: trimmed blocks are no longer allocated; overwrites are reported once', async () => {
    const vol = await ModelVolume.create(store, { blocks: 64, style: 'FIXED' });
    vol.writeBlocks([1, 2, 3, 4, 5, 6]);
    await vol.snapshot();
    vol.trimBlocks(2, 3);
    vol.writeBlocks([6, 6, 1, 9]);
    const snap = await vol.snapshot();
    expect(tuplesOf(await allocated({ snapshotId: snap.id }))).toEqual(fixedTuples(snap.allocated, 4096));
    expect([...snap.allocated].sort((a, b) => a - b)).toEqual([1, 5, 6, 9]); // the model itself, spelled out
  });

  test('GetMetadataAllocated: a snapshot of a never-written volume reports no tuples, with style and capacity', async () => {
    const vol = await ModelVolume.create(store, { blocks: 16, style: 'FIXED' });
    const snap = await vol.snapshot();
    const messages = await allocated({ snapshotId: snap.id });
    expect(tuplesOf(messages)).toEqual([]);
    for (const m of messages) {
      expect(m.blockMetadataType).toBe(BlockMetadataType.FIXED_LENGTH);
      expect(m.volumeCapacityBytes).toBe(BigInt(snap.capacityBytes));
    }
  });

  test('GetMetadataAllocated: a snapshot does not change when its volume is written afterwards', async () => {
    const vol = await ModelVolume.create(store, { blocks: 32, style: 'VARIABLE' });
    vol.writeBlocks([3, 4]);
    const snap = await vol.snapshot();
    const before = tuplesOf(await allocated({ snapshotId: snap.id }));
    vol.writeBlocks([5, 20]);
    vol.trimBlocks(3, 1);
    await vol.snapshot();
    expect(tuplesOf(await allocated({ snapshotId: snap.id }))).toEqual(before);
    expect(before).toEqual(runTuples(snap.allocated, 4096));
  });

  test('GetMetadataAllocated: a clone reports the source snapshot content plus its own writes', async () => {
    const src = await ModelVolume.create(store, { blocks: 64, style: 'FIXED' });
    src.writeBlocks([0, 10, 11]);
    const s = await src.snapshot();
    const clone = await ModelVolume.cloneOf(store, s, 'FIXED');
    clone.writeBlocks([12, 40]);
    clone.trimBlocks(0, 1);
    const cs = await clone.snapshot();
    expect(tuplesOf(await allocated({ snapshotId: cs.id }))).toEqual(fixedTuples(cs.allocated, 4096));
  });

  test('GetMetadataAllocated: a seeded sequence of writes, overwrites and whole-block trims over several snapshots matches the model', async () => {
    for (const style of ['FIXED', 'VARIABLE'] as const) {
      const vol = await ModelVolume.create(store, { blocks: 512, style });
      let x = 12345;
      const next = (n: number) => {
        x = (x * 1103515245 + 12345) >>> 0;
        return x % n;
      };
      const snaps: ModelSnapshot[] = [];
      for (let round = 0; round < 4; round++) {
        for (let op = 0; op < 40; op++) {
          const first = next(500);
          const count = 1 + next(12);
          if (next(4) === 0) vol.trimBlocks(first, count);
          else vol.write(first * 4096 + next(4096), count * 1000);
        }
        snaps.push(await vol.snapshot());
      }
      for (const s of snaps) {
        expect(tuplesOf(await allocated({ snapshotId: s.id, maxResults: 7 })), `${style} ${s.id}`).toEqual(
          expectedTuples(s.allocated, 4096, style),
        );
      }
      for (let i = 0; i < snaps.length; i++) {
        for (let j = i + 1; j < snaps.length; j++) {
          const [a, b] = [snaps[i]!, snaps[j]!];
          expect(
            tuplesOf(await delta({ baseSnapshotId: a.id, targetSnapshotId: b.id, maxResults: 5 })),
            `${style} ${i}->${j}`,
          ).toEqual(expectedTuples(modelDelta(a, b), 4096, style));
        }
      }
    }
  });
});

describe('GetMetadataDelta content', () => {
  test('GetMetadataDelta: reports exactly the blocks written or trimmed between base and target', async () => {
    const vol = await ModelVolume.create(store, { blocks: 128, style: 'FIXED' });
    vol.writeBlocks([0, 1, 2, 3, 50, 51, 127]);
    const base = await vol.snapshot();
    vol.writeBlocks([1, 90]); // overwrite and new
    vol.trimBlocks(50, 2); // trim of data present in base
    vol.write(100 * 4096 + 5, 1); // partial block
    const target = await vol.snapshot();
    const tuples = tuplesOf(await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id }));
    expect(tuples).toEqual(fixedTuples(modelDelta(base, target), 4096));
    expect(coveredBlocks(tuples, 4096)).toEqual([1, 50, 51, 90, 100]); // the model itself, spelled out
  });

  test('GetMetadataDelta: VARIABLE_LENGTH merges adjacent changed blocks into runs', async () => {
    const vol = await ModelVolume.create(store, { blocks: 128, style: 'VARIABLE' });
    vol.writeBlocks([5, 6, 7]);
    const base = await vol.snapshot();
    vol.write(20 * 4096, 10 * 4096);
    vol.writeBlocks([7, 8, 60]);
    vol.trimBlocks(5, 1);
    const target = await vol.snapshot();
    const tuples = tuplesOf(await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id }));
    expect(tuples).toEqual(runTuples(modelDelta(base, target), 4096));
  });

  test('GetMetadataDelta: across several snapshots, reports the union of the changes after base up to target', async () => {
    const vol = await ModelVolume.create(store, { blocks: 64, style: 'FIXED' });
    const s0 = await vol.snapshot();
    vol.writeBlocks([1, 2]);
    const s1 = await vol.snapshot();
    vol.writeBlocks([30]);
    vol.trimBlocks(1, 1);
    const s2 = await vol.snapshot();
    vol.writeBlocks([63]);
    const s3 = await vol.snapshot();
    expect(tuplesOf(await delta({ baseSnapshotId: s0.id, targetSnapshotId: s3.id }))).toEqual(
      fixedTuples(modelDelta(s0, s3), 4096),
    );
    expect(tuplesOf(await delta({ baseSnapshotId: s1.id, targetSnapshotId: s2.id }))).toEqual(
      fixedTuples(modelDelta(s1, s2), 4096),
    );
    expect(tuplesOf(await delta({ baseSnapshotId: s2.id, targetSnapshotId: s3.id }))).toEqual(fixedTuples([63], 4096));
  });

  test('GetMetadataDelta: two snapshots with nothing written between them have an empty delta', async () => {
    const vol = await ModelVolume.create(store, { blocks: 64, style: 'FIXED' });
    vol.writeBlocks([4]);
    const s1 = await vol.snapshot();
    const s2 = await vol.snapshot();
    const messages = await delta({ baseSnapshotId: s1.id, targetSnapshotId: s2.id });
    expect(tuplesOf(messages)).toEqual([]);
    for (const m of messages) expect(m.volumeCapacityBytes).toBe(BigInt(s2.capacityBytes));
  });

  test("GetMetadataDelta: works when the target's volume is a clone of the base snapshot", async () => {
    for (const style of ['FIXED', 'VARIABLE'] as const) {
      const src = await ModelVolume.create(store, { blocks: 64, style });
      src.writeBlocks([0, 1, 2, 3, 10]);
      const base = await src.snapshot();
      src.writeBlocks([20]); // the source keeps changing; that is not the clone's history
      await src.snapshot();
      const clone = await ModelVolume.cloneOf(store, base, style);
      clone.writeBlocks([3, 4, 5, 33]);
      clone.trimBlocks(10, 1);
      const target = await clone.snapshot();
      const tuples = tuplesOf(await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id }));
      expect(tuples, style).toEqual(expectedTuples(modelDelta(base, target), 4096, style));
      expect(coveredBlocks(tuples, 4096), style).toEqual([3, 4, 5, 10, 33]);
    }
  });

  test('GetMetadataDelta: a clone with a larger capacity reports its own capacity and changes past the source size', async () => {
    const src = await ModelVolume.create(store, { blocks: 16, style: 'FIXED' });
    src.writeBlocks([1]);
    const base = await src.snapshot();
    const clone = await ModelVolume.cloneOf(store, base, 'FIXED', 32 * 4096);
    clone.writeBlocks([2, 31]);
    const target = await clone.snapshot();
    const messages = await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id });
    expect(tuplesOf(messages)).toEqual(fixedTuples([2, 31], 4096));
    for (const m of messages) expect(m.volumeCapacityBytes).toBe(BigInt(32 * 4096));
  });
});

// ------------------------------------------------------------------ stream format rules

describe('stream format', () => {
  test('FIXED_LENGTH: every message says FIXED_LENGTH and every size_bytes equals the volume block size', async () => {
    const blockSize = 16 * KiB; // not the driver default, so a constant 4096 would fail
    const vol = await ModelVolume.create(store, { blocks: 200, blockSize, style: 'FIXED' });
    const base = await vol.snapshot();
    vol.write(0, 40 * blockSize); // a long run: FIXED must still split it into blocks
    vol.writeBlocks([77, 150, 199]);
    const target = await vol.snapshot();
    for (const messages of [
      await allocated({ snapshotId: target.id, maxResults: 6 }),
      await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, maxResults: 6 }),
    ]) {
      expect(messages.length).toBeGreaterThan(1);
      for (const m of messages) {
        expect(m.blockMetadataType).toBe(BlockMetadataType.FIXED_LENGTH);
        for (const t of m.blockMetadata) expect(t.sizeBytes).toBe(BigInt(blockSize));
      }
      expect(coveredBlocks(tuplesOf(messages), blockSize)).toEqual([...target.allocated].sort((a, b) => a - b));
    }
  });

  test('VARIABLE_LENGTH: every message says VARIABLE_LENGTH, and the style does not change mid-stream', async () => {
    const vol = await ModelVolume.create(store, { blocks: 400, style: 'VARIABLE' });
    const base = await vol.snapshot();
    for (let b = 0; b < 400; b += 3) vol.writeBlocks([b, b + 1].filter((x) => x < 400));
    const target = await vol.snapshot();
    for (const messages of [
      await allocated({ snapshotId: target.id, maxResults: 4 }),
      await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, maxResults: 4 }),
    ]) {
      expect(messages.length).toBeGreaterThan(10);
      expect(new Set(messages.map((m) => m.blockMetadataType))).toEqual(new Set([BlockMetadataType.VARIABLE_LENGTH]));
    }
  });

  test("a snapshot without a recorded style is reported in the driver's default style, constant across the stream", async () => {
    const vol = await ModelVolume.create(store, { blocks: 64 }); // no metadataStyle attribute
    vol.writeBlocks([1, 2, 3, 9]);
    const snap = await vol.snapshot();
    const messages = await allocated({ snapshotId: snap.id, maxResults: 1 });
    expect(new Set(messages.map((m) => m.blockMetadataType))).toEqual(new Set([STYLE_CODE.VARIABLE]));
    expect(tuplesOf(messages)).toEqual(runTuples(snap.allocated, 4096));
  });

  test("volume_capacity_bytes equals the snapshot's capacity in every message", async () => {
    const vol = await ModelVolume.create(store, { blocks: 300, style: 'FIXED' });
    const base = await vol.snapshot();
    vol.write(0, 300 * 4096);
    const target = await vol.snapshot();
    const all = await allocated({ snapshotId: target.id, maxResults: 50 });
    const changed = await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, maxResults: 50 });
    expect(all.length).toBe(6);
    expect(changed.length).toBe(6);
    for (const m of [...all, ...changed]) expect(m.volumeCapacityBytes).toBe(BigInt(300 * 4096));
  });

  test('volume_capacity_bytes: after the volume grows, an older snapshot still reports its own capacity, a newer one the new capacity', async () => {
    const vol = await ModelVolume.create(store, { blocks: 256, style: 'FIXED' }); // 1 MiB
    vol.writeBlocks([0, 255]);
    const small = await vol.snapshot();
    await vol.grow(2 * MiB);
    vol.writeBlocks([400]);
    const large = await vol.snapshot();
    for (const m of await allocated({ snapshotId: small.id })) expect(m.volumeCapacityBytes).toBe(BigInt(MiB));
    for (const m of await allocated({ snapshotId: large.id })) expect(m.volumeCapacityBytes).toBe(BigInt(2 * MiB));
    const changed = await delta({ baseSnapshotId: small.id, targetSnapshotId: large.id });
    for (const m of changed) expect(m.volumeCapacityBytes).toBe(BigInt(2 * MiB));
    expect(tuplesOf(changed)).toEqual(fixedTuples([400], 4096));
    expect(tuplesOf(await allocated({ snapshotId: small.id }))).toEqual(fixedTuples(small.allocated, 4096));
  });

  test("starting_offset is bounded by the snapshot's own capacity, not the grown volume's", async () => {
    const vol = await ModelVolume.create(store, { blocks: 256, style: 'FIXED' }); // 1 MiB
    const small = await vol.snapshot();
    await vol.grow(2 * MiB);
    const large = await vol.snapshot();
    const past = BigInt(MiB + 4096);
    expect(await codeOf(allocated({ snapshotId: small.id, startingOffset: past }))).toBe(status.OUT_OF_RANGE);
    expect(await codeOf(allocated({ snapshotId: large.id, startingOffset: past }))).toBe(0);
    expect(await codeOf(delta({ baseSnapshotId: small.id, targetSnapshotId: large.id, startingOffset: past }))).toBe(0);
  });

  test('tuples are strictly increasing and never overlap, within and across messages', async () => {
    for (const style of ['FIXED', 'VARIABLE'] as const) {
      const vol = await ModelVolume.create(store, { blocks: 1000, style });
      const base = await vol.snapshot();
      // Runs of varying lengths with gaps, so message boundaries fall inside and between runs.
      for (let b = 0, len = 1; b < 1000; b += len + (len % 3) + 1, len = (len % 7) + 1)
        vol.write(b * 4096, Math.min(len, 1000 - b) * 4096);
      const target = await vol.snapshot();
      for (const maxResults of [1, 2, 3, 13]) {
        const a = tuplesOf(await allocated({ snapshotId: target.id, maxResults }));
        const dl = tuplesOf(await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, maxResults }));
        expectOrderedAndDisjoint(a);
        expectOrderedAndDisjoint(dl);
        expect(a, `${style} ${maxResults}`).toEqual(expectedTuples(target.allocated, 4096, style));
        expect(dl, `${style} ${maxResults}`).toEqual(expectedTuples(modelDelta(base, target), 4096, style));
      }
    }
  });

  test('max_results: every message carries at most max_results tuples, and all tuples arrive', async () => {
    const vol = await ModelVolume.create(store, { blocks: 500, style: 'FIXED' });
    const base = await vol.snapshot();
    vol.write(0, 500 * 4096);
    const target = await vol.snapshot();
    for (const maxResults of [1, 7, 64, 499, 500, 501, 2 ** 31 - 1]) {
      for (const messages of [
        await allocated({ snapshotId: target.id, maxResults }),
        await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, maxResults }),
      ]) {
        for (const m of messages) expect(m.blockMetadata.length).toBeLessThanOrEqual(maxResults);
        expect(tuplesOf(messages)).toEqual(fixedTuples(target.allocated, 4096));
      }
    }
  });

  test('max_results 0: the driver picks its configured default (tuples a message), and all tuples arrive', async () => {
    const blocks = DEFAULT_MAX_RESULTS * 2 + DEFAULT_MAX_RESULTS / 2;
    const vol = await ModelVolume.create(store, { blocks, style: 'FIXED' });
    const base = await vol.snapshot();
    vol.write(0, blocks * 4096);
    const target = await vol.snapshot();
    for (const messages of [
      await allocated({ snapshotId: target.id, maxResults: 0 }),
      await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id }),
    ]) {
      const sizes = messages.map((m) => m.blockMetadata.length);
      expect(Math.max(...sizes)).toBe(DEFAULT_MAX_RESULTS);
      expect(tuplesOf(messages)).toEqual(fixedTuples(target.allocated, 4096));
    }
  });
});

// ------------------------------------------------------------------ starting_offset and resumption

describe('starting_offset', () => {
  /** Blocks 0-2, 5, 9-12, 20, 31 of a 32-block volume; base is the empty volume. */
  async function layout(style: Style) {
    const vol = await ModelVolume.create(store, { blocks: 32, style });
    const base = await vol.snapshot();
    vol.writeBlocks([0, 1, 2, 5, 9, 10, 11, 12, 20, 31]);
    const target = await vol.snapshot();
    return { base, target };
  }
  const B = 4096;
  const OFFSETS = [
    0,
    1,
    B - 1,
    B,
    2 * B + 100,
    3 * B,
    4 * B + 7,
    10 * B + 1,
    12 * B,
    13 * B,
    31 * B,
    32 * B - 1,
    32 * B,
  ];

  for (const style of ['FIXED', 'VARIABLE'] as const) {
    test(`starting_offset (${style}): the first tuple ends after S, and the stream reports exactly the data ending after S`, async () => {
      const { base, target } = await layout(style);
      for (const s of OFFSETS) {
        for (const messages of [
          await allocated({ snapshotId: target.id, startingOffset: BigInt(s), maxResults: 2 }),
          await delta({
            baseSnapshotId: base.id,
            targetSnapshotId: target.id,
            startingOffset: BigInt(s),
            maxResults: 2,
          }),
        ]) {
          const tuples = tuplesOf(messages);
          const first = tuples[0];
          if (first) expect(first.offset + first.length, `S=${s}`).toBeGreaterThan(s);
          expectOrderedAndDisjoint(tuples);
          const expected = blocksEndingAfter(target.allocated, B, s);
          expect(coveredBlocks(tuples, B), `S=${s}`).toEqual(expected);
          expect(tuples, `S=${s}`).toEqual(expectedTuples(expected, B, style));
        }
      }
    });

    test(`interrupted stream (${style}): resuming from the end of the last tuple received gives exactly the remainder`, async () => {
      const { base, target } = await layout(style);
      const full = {
        allocated: tuplesOf(await allocated({ snapshotId: target.id, maxResults: 3 })),
        delta: tuplesOf(await delta({ baseSnapshotId: base.id, targetSnapshotId: target.id, maxResults: 3 })),
      };
      const open = {
        allocated: (startingOffset: bigint) =>
          d.metadata.stream('getMetadataAllocated', { snapshotId: target.id, maxResults: 3, startingOffset }),
        delta: (startingOffset: bigint) =>
          d.metadata.stream('getMetadataDelta', {
            baseSnapshotId: base.id,
            targetSnapshotId: target.id,
            maxResults: 3,
            startingOffset,
          }),
      };
      for (const rpc of ['allocated', 'delta'] as const) {
        // Receive one message at a time, cancelling after each, until a resumed call returns nothing more.
        const received: Tuple[] = [];
        let next = 0n;
        for (let attempts = 0; attempts < 50; attempts++) {
          const call = open[rpc](next);
          const first = (await firstMessageThenCancel(call)) as MetadataMessage | undefined;
          const got = first ? tuplesOf([first]) : [];
          if (got.length === 0) break;
          received.push(...got);
          const last = got[got.length - 1]!;
          next = BigInt(last.offset + last.length);
        }
        expect(received, rpc).toEqual(full[rpc]);
        expect(full[rpc].length).toBeGreaterThan(3); // the scenario really spans several messages
      }
    });
  }

  test('interrupted stream: resuming at any byte inside the last tuple received reports that block again, never anything before it', async () => {
    const { target } = await layout('FIXED');
    const first = (await firstMessageThenCancel(
      d.metadata.stream('getMetadataAllocated', { snapshotId: target.id, maxResults: 4 }),
    )) as MetadataMessage | undefined;
    const got = tuplesOf(first ? [first] : []);
    const last = got[got.length - 1]!;
    const resumed = tuplesOf(await allocated({ snapshotId: target.id, startingOffset: BigInt(last.offset + 1) }));
    expect(resumed[0]).toEqual(last);
    expect([...got.slice(0, -1), ...resumed]).toEqual(fixedTuples(target.allocated, B));
  });
});

// ------------------------------------------------------------------ cancellation and backpressure

describe('cancellation', () => {
  /** A driver of its own, with its log lines captured so the test can see each RPC finish. */
  let own: {
    driver: RunningDriver;
    dir: string;
    lines: Record<string, unknown>[];
    identity: ServiceClient<typeof Identity>;
    metadata: ServiceClient<typeof SnapshotMetadata>;
  };
  beforeAll(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-csi-cancel-'));
    const lines: Record<string, unknown>[] = [];
    const capture: DestinationStream = {
      write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>),
    };
    const config = testConfig(dir, { logLevel: 'info' });
    const driver = await startDriver(config, createLogger('info', capture));
    const target = `unix://${config.endpoint.kind === 'unix' ? config.endpoint.path : ''}`;
    own = {
      driver,
      dir,
      lines,
      identity: new ServiceClient(Identity, target),
      metadata: new ServiceClient(SnapshotMetadata, target),
    };
  });
  afterAll(async () => {
    if (!own) return;
    own.identity.close();
    own.metadata.close();
    await own.driver.stop();
    fs.rmSync(own.dir, { recursive: true, force: true });
  });

  async function rpcLine(method: string, timeoutMs = 10_000): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = own.lines.find((l) => l.msg === 'rpc' && l.method === method);
      if (line) return line;
      if (Date.now() > deadline)
        throw new Error(`no log line for ${method}; lines: ${JSON.stringify(own.lines).slice(0, 2000)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  test('a client that reads one message of a 200,000-block stream and cancels: the server stops streaming, logs the RPC as finished, and keeps answering', async () => {
    const BLOCKS = 200_000;
    const s = own.driver.store;
    const vol = await s.createVolume({ capacityBytes: BLOCKS * 4096, attributes: { metadataStyle: 'FIXED' } });
    const base = await s.createSnapshot({ volumeId: vol.id, attributes: { metadataStyle: 'FIXED' } });
    // Trims change every block without writing 800 MB of data.
    s.trim(vol.id, 0, BLOCKS * 4096);
    const target = await s.createSnapshot({ volumeId: vol.id, attributes: { metadataStyle: 'FIXED' } });

    const call = own.metadata.stream('getMetadataDelta', {
      baseSnapshotId: base.id,
      targetSnapshotId: target.id,
      maxResults: 256,
    });
    const ended = new Promise<number>((resolve) => {
      call.on('error', (err: { code: number }) => resolve(err.code));
      call.on('end', () => resolve(0));
    });
    const first = await new Promise<MetadataMessage>((resolve) => call.once('data', resolve));
    call.pause(); // stop reading: the server must be held back by flow control, not run ahead
    expect(first.blockMetadata.length).toBe(256);
    await new Promise((r) => setTimeout(r, 500));
    call.cancel();
    expect(await ended).toBe(status.CANCELLED);

    expect((await own.identity.call('probe', {})).ready).toBe(true);
    const line = await rpcLine('GetMetadataDelta');
    expect(line.code, JSON.stringify(line)).toBe('CANCELLED');
    // Backpressure: a stalled reader got nowhere near the whole stream out of the server.
    expect(Number(line.tuples ?? 0)).toBeLessThan(BLOCKS);

    // And the same stream read to the end afterwards is complete.
    const all = tuplesOf(
      (await own.metadata.collect('getMetadataDelta', {
        baseSnapshotId: base.id,
        targetSnapshotId: target.id,
        maxResults: 4096,
      })) as MetadataMessage[],
    );
    expect(all.length).toBe(BLOCKS);
    expect(all[BLOCKS - 1]).toEqual({ offset: (BLOCKS - 1) * 4096, length: 4096 });
  });
});
