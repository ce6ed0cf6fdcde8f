/**
 * Model-based property test of the storage engine: random sequences of writes (any byte range), trims,
 * flushes, snapshots, group snapshots, clones, growth, deletes (of snapshots, groups and volumes),
 * compaction and reopening drive a real BlockStore in a
 * temp dir and the in-memory BlockModel side by side. After every command the engine must read,
 * allocate and delta exactly as the model says.
 *
 * CBT_PROPERTY_RUNS sets the number of runs (default 60). A failure prints fast-check's seed, path
 * and the commands' replayPath; replay with fc.assert(..., { seed, path }) plus
 * fc.commands(..., { replayPath }). Runs with autoCompact on race background compaction against the
 * commands, so those may not replay exactly: that interleaving is deliberately part of what is tested.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockStore } from '../../storage-engine/index.js';
import { BusyError, NotFoundError, UnrelatedSnapshotsError } from '../../storage-engine/errors.js';
import type { Extent, ExtentQueryOptions, ExtentStyle, StoreOptions } from '../../storage-engine/types.js';
import {
  BlockModel,
  expectedExtents,
  extentShapeViolation,
  mulberry32,
  patternBytes,
  type ModelSnapshot,
  type ModelVolume,
} from './support/block-model.js';

const NUM_RUNS = Number.parseInt(process.env.CBT_PROPERTY_RUNS ?? '', 10) || 60;
const MAX_COMMANDS = 40;
const MIN_BLOCKS = 8;
const MAX_BLOCKS = 48;
/** Growth and larger clones may go past MAX_BLOCKS up to this. */
const MAX_GROWN_BLOCKS = 64;
const MAX_VOLUMES = 5;
const MAX_SNAPSHOTS = 8;

interface Real {
  readonly dir: string;
  readonly options: StoreOptions;
  store: BlockStore;
  /** Drives the random sub-ranges and starting offsets of the checks; seeded per run so a seed replays. */
  readonly rng: () => number;
}

type Cmd = fc.AsyncCommand<BlockModel, Real>;

function pick<T>(items: readonly T[], n: number): T {
  const item = items[n % items.length];
  if (item === undefined) throw new Error('pick from an empty list (check() should have prevented this)');
  return item;
}

interface RangeParams {
  vol: number;
  off: number;
  len: number;
  /** Whole blocks only; otherwise any byte offset and length (partial and spanning blocks). */
  aligned: boolean;
}

const rangeParams = fc.record({
  vol: fc.nat(),
  off: fc.nat(),
  len: fc.nat(),
  aligned: fc.boolean(),
});

function resolveRange(capacityBytes: number, bs: number, p: RangeParams): { offset: number; length: number } {
  if (p.aligned) {
    const capBlocks = capacityBytes / bs;
    const blocks = 1 + (p.len % Math.min(4, capBlocks));
    const first = p.off % (capBlocks - blocks + 1);
    return { offset: first * bs, length: blocks * bs };
  }
  const length = 1 + (p.len % Math.min(3 * bs, capacityBytes));
  const offset = p.off % (capacityBytes - length + 1);
  return { offset, length };
}

class WriteCmd implements Cmd {
  constructor(
    readonly p: RangeParams,
    readonly seed: number,
  ) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const vol = pick(m.volumes, this.p.vol);
    const { offset, length } = resolveRange(vol.capacityBytes, m.blockSize, this.p);
    const data = patternBytes(this.seed, length);
    r.store.write(vol.id, offset, data);
    m.write(vol, offset, data);
    await verify(m, r);
  }
  toString(): string {
    return `write(${JSON.stringify(this.p)}, seed=${this.seed})`;
  }
}

class TrimCmd implements Cmd {
  constructor(readonly p: RangeParams) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const vol = pick(m.volumes, this.p.vol);
    const { offset, length } = resolveRange(vol.capacityBytes, m.blockSize, this.p);
    r.store.trim(vol.id, offset, length);
    m.trim(vol, offset, length);
    await verify(m, r);
  }
  toString(): string {
    return `trim(${JSON.stringify(this.p)})`;
  }
}

class FlushCmd implements Cmd {
  constructor(readonly vol: number) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    await r.store.flush(pick(m.volumes, this.vol).id);
    await verify(m, r);
  }
  toString(): string {
    return `flush(vol#${this.vol})`;
  }
}

class SnapshotCmd implements Cmd {
  constructor(readonly vol: number) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0 && m.snapshots.length < MAX_SNAPSHOTS;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const vol = pick(m.volumes, this.vol);
    const info = await r.store.createSnapshot({ volumeId: vol.id });
    m.snapshot(vol, info.id);
    await verify(m, r);
  }
  toString(): string {
    return `snapshot(vol#${this.vol})`;
  }
}

class DeleteSnapshotCmd implements Cmd {
  constructor(readonly snap: number) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.snapshots.length > 0;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const snap = pick(m.snapshots, this.snap);
    if (snap.groupId !== undefined) {
      // A group's member goes with its group only; the refusal changes nothing.
      await expect(r.store.deleteSnapshot(snap.id), 'deleting a group member alone').rejects.toThrow(BusyError);
    } else {
      await r.store.deleteSnapshot(snap.id);
      m.deleteSnapshot(snap);
    }
    await verify(m, r);
  }
  toString(): string {
    return `deleteSnapshot(snap#${this.snap})`;
  }
}

class GroupSnapshotCmd implements Cmd {
  constructor(readonly vols: number[]) {}
  /** Distinct volumes picked by the indexes, in pick order. */
  private members(m: Readonly<BlockModel>): ModelVolume[] {
    return [...new Set(this.vols.map((v) => pick(m.volumes, v)))];
  }
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0 && m.snapshots.length + this.members(m).length <= MAX_SNAPSHOTS;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const vols = this.members(m);
    const info = await r.store.createGroupSnapshot({ members: vols.map((v) => ({ volumeId: v.id })) });
    expect(
      info.snapshots.map((s) => s.sourceVolumeId),
      'group members follow the request order',
    ).toEqual(vols.map((v) => v.id));
    m.groupSnapshot(
      vols,
      info.id,
      info.snapshots.map((s) => s.id),
    );
    await verify(m, r);
  }
  toString(): string {
    return `groupSnapshot(vols#${this.vols.join(',')})`;
  }
}

class DeleteGroupCmd implements Cmd {
  constructor(readonly group: number) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.groups.length > 0;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const group = pick(m.groups, this.group);
    await r.store.deleteGroupSnapshot(group.id);
    m.deleteGroup(group);
    await verify(m, r);
  }
  toString(): string {
    return `deleteGroup(group#${this.group})`;
  }
}

class CloneSnapshotCmd implements Cmd {
  constructor(
    readonly snap: number,
    readonly extraBlocks: number,
    readonly passBlockSize: boolean,
  ) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.snapshots.length > 0 && m.volumes.length < MAX_VOLUMES;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const snap = pick(m.snapshots, this.snap);
    const capacityBytes = grownCapacity(snap.capacityBytes, m.blockSize, this.extraBlocks);
    const info = await r.store.createVolume({
      capacityBytes,
      sourceSnapshotId: snap.id,
      ...(this.passBlockSize ? { blockSize: m.blockSize } : {}),
    });
    m.cloneFromSnapshot(snap, info.id, capacityBytes);
    await verify(m, r);
  }
  toString(): string {
    return `cloneSnapshot(snap#${this.snap}, +${this.extraBlocks} blocks, blockSize ${this.passBlockSize ? 'given' : 'omitted'})`;
  }
}

class CloneVolumeCmd implements Cmd {
  constructor(
    readonly vol: number,
    readonly extraBlocks: number,
  ) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0 && m.volumes.length < MAX_VOLUMES;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const src = pick(m.volumes, this.vol);
    const capacityBytes = grownCapacity(src.capacityBytes, m.blockSize, this.extraBlocks);
    const info = await r.store.createVolume({ capacityBytes, sourceVolumeId: src.id });
    m.cloneFromVolume(src, info.id, capacityBytes);
    await verify(m, r);
  }
  toString(): string {
    return `cloneVolume(vol#${this.vol}, +${this.extraBlocks} blocks)`;
  }
}

class CreateVolumeCmd implements Cmd {
  constructor(
    readonly blocks: number,
    readonly passBlockSize: boolean,
  ) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length < MAX_VOLUMES;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const capacityBytes = this.blocks * m.blockSize;
    const info = await r.store.createVolume({
      capacityBytes,
      ...(this.passBlockSize ? { blockSize: m.blockSize } : {}),
    });
    m.createVolume(info.id, capacityBytes);
    await verify(m, r);
  }
  toString(): string {
    return `createVolume(${this.blocks} blocks)`;
  }
}

class GrowCmd implements Cmd {
  constructor(
    readonly vol: number,
    readonly extraBlocks: number,
  ) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const vol = pick(m.volumes, this.vol);
    const capacityBytes = grownCapacity(vol.capacityBytes, m.blockSize, this.extraBlocks);
    if (capacityBytes === vol.capacityBytes) return;
    const info = await r.store.growVolume(vol.id, capacityBytes);
    expect(info.capacityBytes, 'growVolume returns the new capacity').toBe(capacityBytes);
    m.grow(vol, capacityBytes);
    await verify(m, r);
  }
  toString(): string {
    return `grow(vol#${this.vol}, +${this.extraBlocks} blocks)`;
  }
}

class DeleteVolumeCmd implements Cmd {
  constructor(readonly vol: number) {}
  check(m: Readonly<BlockModel>): boolean {
    return m.volumes.length > 0;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    const vol = pick(m.volumes, this.vol);
    await r.store.deleteVolume(vol.id);
    m.deleteVolume(vol);
    await verify(m, r);
  }
  toString(): string {
    return `deleteVolume(vol#${this.vol})`;
  }
}

class CompactCmd implements Cmd {
  check(): boolean {
    return true;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    await r.store.compact();
    await verify(m, r);
  }
  toString(): string {
    return 'compact()';
  }
}

class ReopenCmd implements Cmd {
  check(): boolean {
    return true;
  }
  async run(m: BlockModel, r: Real): Promise<void> {
    await r.store.close();
    r.store = BlockStore.open(r.dir, r.options);
    await verify(m, r);
  }
  toString(): string {
    return 'reopen()';
  }
}

/** Capacity plus extra blocks, capped so runs stay small (the cap never goes below the current size). */
function grownCapacity(capacityBytes: number, bs: number, extraBlocks: number): number {
  const blocks = capacityBytes / bs;
  return Math.max(blocks, Math.min(blocks + extraBlocks, MAX_GROWN_BLOCKS)) * bs;
}

const writeArb = fc.tuple(rangeParams, fc.integer()).map(([p, seed]) => new WriteCmd(p, seed));
const trimArb = rangeParams.map((p) => new TrimCmd(p));
/** Mostly the same capacity as the source, sometimes larger. */
const extraBlocksArb = fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 16 }));

// fc.commands picks uniformly among the arbitraries: listing some twice weights them.
const commandArbs: fc.Arbitrary<Cmd>[] = [
  writeArb,
  writeArb,
  writeArb,
  trimArb,
  trimArb,
  fc.nat().map((v) => new FlushCmd(v)),
  fc.nat().map((v) => new SnapshotCmd(v)),
  fc.nat().map((v) => new SnapshotCmd(v)),
  fc.nat().map((v) => new SnapshotCmd(v)),
  fc.nat().map((s) => new DeleteSnapshotCmd(s)),
  fc.nat().map((s) => new DeleteSnapshotCmd(s)),
  fc.array(fc.nat(), { minLength: 1, maxLength: 3 }).map((v) => new GroupSnapshotCmd(v)),
  fc.nat().map((g) => new DeleteGroupCmd(g)),
  fc.tuple(fc.nat(), extraBlocksArb, fc.boolean()).map(([s, x, b]) => new CloneSnapshotCmd(s, x, b)),
  fc.tuple(fc.nat(), extraBlocksArb).map(([v, x]) => new CloneVolumeCmd(v, x)),
  fc.tuple(fc.integer({ min: MIN_BLOCKS, max: MAX_BLOCKS }), fc.boolean()).map(([n, b]) => new CreateVolumeCmd(n, b)),
  fc.tuple(fc.nat(), fc.integer({ min: 1, max: 16 })).map(([v, x]) => new GrowCmd(v, x)),
  fc.nat().map((v) => new DeleteVolumeCmd(v)),
  fc.constant(new CompactCmd()),
  fc.constant(new CompactCmd()),
  fc.constant(new ReopenCmd()),
];

// ---------------------------------------------------------------------------------------------
// Checks run after every command.

async function collect(
  stream: { capacityBytes: number; blockSize: number; style: ExtentStyle } & AsyncIterable<Extent[]>,
  what: string,
  expected: { capacityBytes: number; blockSize: number; style: ExtentStyle; batchSize: number },
): Promise<Extent[]> {
  expect(
    { capacityBytes: stream.capacityBytes, blockSize: stream.blockSize, style: stream.style },
    `${what}: stream metadata`,
  ).toEqual({ capacityBytes: expected.capacityBytes, blockSize: expected.blockSize, style: expected.style });
  const all: Extent[] = [];
  for await (const batch of stream) {
    if (batch.length > expected.batchSize) {
      throw new Error(`${what}: batch of ${batch.length} extents exceeds batchSize ${expected.batchSize}`);
    }
    all.push(...batch.map((e) => ({ offset: e.offset, length: e.length })));
  }
  return all;
}

function assertExtents(actual: Extent[], expected: Extent[], what: string): void {
  // Cheap comparison first; expect() only to print a readable diff on failure.
  if (JSON.stringify(actual) !== JSON.stringify(expected)) expect(actual, what).toEqual(expected);
}

function assertBytes(actual: Uint8Array, expected: Uint8Array, what: string, baseOffset: number): void {
  if (actual.length === expected.length && Buffer.compare(actual, expected) === 0) return;
  let i = 0;
  while (i < Math.min(actual.length, expected.length) && actual[i] === expected[i]) i++;
  throw new Error(
    `${what}: content differs from the model at byte ${baseOffset + i} ` +
      `(got ${actual[i]}, want ${expected[i]}; lengths ${actual.length} vs ${expected.length})`,
  );
}

function randomRange(rng: () => number, capacityBytes: number): { offset: number; length: number } {
  const offset = Math.floor(rng() * capacityBytes);
  const length = 1 + Math.floor(rng() * (capacityBytes - offset));
  return { offset, length };
}

/** Any byte offset in [0, capacity]: sometimes the very end, sometimes block aligned, else arbitrary. */
function randomStartingOffset(rng: () => number, capacityBytes: number, bs: number): number {
  const r = rng();
  if (r < 0.1) return capacityBytes;
  if (r < 0.4) return Math.floor(rng() * (capacityBytes / bs)) * bs;
  return Math.floor(rng() * capacityBytes);
}

const STYLES: readonly ExtentStyle[] = ['FIXED', 'VARIABLE'];

/**
 * Queries one extent stream in both styles from offset 0 and once more from a random starting offset
 * with a small batch size, and compares each with what the model's block set implies.
 */
async function checkExtentQuery(
  query: (options: ExtentQueryOptions) => ReturnType<BlockStore['allocated']>,
  expectedBlocks: Set<number>,
  target: ModelSnapshot,
  bs: number,
  rng: () => number,
  what: string,
): Promise<void> {
  for (const style of STYLES) {
    const label = `${what} ${style}`;
    const actual = await collect(query({ style }), label, {
      capacityBytes: target.capacityBytes,
      blockSize: bs,
      style,
      batchSize: 4096,
    });
    const shape = extentShapeViolation(actual, bs, style, target.capacityBytes, 0);
    if (shape !== undefined) throw new Error(`${label}: ${shape}`);
    assertExtents(actual, expectedExtents(expectedBlocks, bs, style), label);
  }
  const style = rng() < 0.5 ? 'FIXED' : 'VARIABLE';
  const startingOffset = randomStartingOffset(rng, target.capacityBytes, bs);
  const batchSize = 1 + Math.floor(rng() * 4);
  const label = `${what} ${style} startingOffset=${startingOffset} batchSize=${batchSize}`;
  const actual = await collect(query({ style, startingOffset, batchSize }), label, {
    capacityBytes: target.capacityBytes,
    blockSize: bs,
    style,
    batchSize,
  });
  const shape = extentShapeViolation(actual, bs, style, target.capacityBytes, startingOffset);
  if (shape !== undefined) throw new Error(`${label}: ${shape}`);
  assertExtents(actual, expectedExtents(expectedBlocks, bs, style, startingOffset), label);
}

async function verify(m: BlockModel, r: Real): Promise<void> {
  const { store, rng } = r;
  const bs = m.blockSize;

  expect(
    store.listVolumes().map((v) => v.id),
    'listVolumes lists the live volumes in creation order',
  ).toEqual(m.volumes.map((v) => v.id));
  expect(
    store.listSnapshots().map((s) => s.id),
    'listSnapshots lists the live snapshots in creation order',
  ).toEqual(m.snapshots.map((s) => s.id));
  expect(
    store.listGroupSnapshots().map((g) => ({ id: g.id, members: g.snapshots.map((s) => s.id) })),
    'listGroupSnapshots lists the live groups, whole, in creation order',
  ).toEqual(m.groups.map((g) => ({ id: g.id, members: g.members.map((s) => s.id) })));

  for (const vol of m.volumes) {
    const info = store.getVolume(vol.id);
    expect(
      { capacityBytes: info.capacityBytes, blockSize: info.blockSize, source: info.source },
      `getVolume(${vol.id})`,
    ).toEqual({ capacityBytes: vol.capacityBytes, blockSize: bs, source: vol.source });
    expect(
      store.listSnapshots({ sourceVolumeId: vol.id }).map((s) => s.id),
      `listSnapshots({sourceVolumeId: ${vol.id}})`,
    ).toEqual(m.snapshots.filter((s) => s.sourceVolumeId === vol.id).map((s) => s.id));
    checkVolumeContent(store, vol, rng);
  }

  for (const snap of m.snapshots) {
    const info = store.getSnapshot(snap.id);
    expect(
      {
        sourceVolumeId: info.sourceVolumeId,
        capacityBytes: info.capacityBytes,
        blockSize: info.blockSize,
        groupId: info.groupId,
      },
      `getSnapshot(${snap.id})`,
    ).toEqual({
      sourceVolumeId: snap.sourceVolumeId,
      capacityBytes: snap.capacityBytes,
      blockSize: bs,
      groupId: snap.groupId,
    });
    assertBytes(store.readSnapshot(snap.id, 0, snap.capacityBytes), snap.content, `readSnapshot(${snap.id})`, 0);
    const { offset, length } = randomRange(rng, snap.capacityBytes);
    assertBytes(
      store.readSnapshot(snap.id, offset, length),
      snap.content.subarray(offset, offset + length),
      `readSnapshot(${snap.id}, ${offset}, ${length})`,
      offset,
    );
    await checkExtentQuery(
      (options) => store.allocated(snap.id, options),
      m.allocated(snap),
      snap,
      bs,
      rng,
      `allocated(${snap.id})`,
    );
  }

  for (const base of m.snapshots) {
    for (const target of m.snapshots) {
      await checkDelta(store, m, base, target, rng);
    }
  }
  // Invariant 8: a deleted base answers exactly as if it still existed, through compaction and reopen.
  for (const base of m.deletedSnapshots) {
    for (const target of m.snapshots) {
      await checkDelta(store, m, base, target, rng, true);
    }
  }
}

function checkVolumeContent(store: BlockStore, vol: ModelVolume, rng: () => number): void {
  assertBytes(store.read(vol.id, 0, vol.capacityBytes), vol.content, `read(${vol.id})`, 0);
  for (let i = 0; i < 2; i++) {
    const { offset, length } = randomRange(rng, vol.capacityBytes);
    assertBytes(
      store.read(vol.id, offset, length),
      vol.content.subarray(offset, offset + length),
      `read(${vol.id}, ${offset}, ${length})`,
      offset,
    );
  }
}

async function checkDelta(
  store: BlockStore,
  m: BlockModel,
  base: ModelSnapshot,
  target: ModelSnapshot,
  rng: () => number,
  baseDeleted = false,
): Promise<void> {
  const what = `delta(${baseDeleted ? 'deleted ' : ''}${base.id}, ${target.id})`;
  const expected = m.delta(base, target);
  if (expected === undefined) {
    let error: unknown;
    try {
      store.delta(base.id, target.id);
    } catch (err) {
      error = err;
    }
    // A deleted base whose layers are all gone is forgotten (nothing can be a later target): unknown, not unrelated.
    const allowed = baseDeleted ? [UnrelatedSnapshotsError, NotFoundError] : [UnrelatedSnapshotsError];
    expect(
      allowed.some((e) => error instanceof e),
      `${what}: base is not in target's lineage, got ${String(error)}`,
    ).toBe(true);
    return;
  }
  // Invariant 1 holds in the model by construction; checking it here guards the model itself.
  for (const block of m.differingBlocks(base.content, target.content)) {
    if (!expected.has(block)) throw new Error(`${what}: model misses changed block ${block} (model bug)`);
  }
  await checkExtentQuery(
    (options) => store.delta(base.id, target.id, options),
    expected,
    target,
    m.blockSize,
    rng,
    what,
  );
}

// ---------------------------------------------------------------------------------------------

describe('BlockStore against the in-memory block model', () => {
  let root: string;
  beforeAll(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-model-'));
  });
  afterAll(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('after every random write/trim/flush/snapshot/group snapshot/clone/grow/delete/compact/reopen, reads, allocated, ' +
    'delta and listings equal the model exactly', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(4096, 8192),
        fc.integer({ min: MIN_BLOCKS, max: MAX_BLOCKS }),
        fc.boolean(),
        fc.integer(),
        fc.commands(commandArbs, { maxCommands: MAX_COMMANDS, size: 'max' }),
        async (blockSize, initialBlocks, autoCompact, checkSeed, cmds) => {
          const dir = fs.mkdtempSync(path.join(root, 'run-'));
          const options: StoreOptions = { defaultBlockSize: blockSize, autoCompact };
          const real: Real = { dir, options, store: BlockStore.open(dir, options), rng: mulberry32(checkSeed) };
          try {
            await fc.asyncModelRun(async () => {
              const model = new BlockModel(blockSize);
              const capacityBytes = initialBlocks * blockSize;
              const info = await real.store.createVolume({ capacityBytes, blockSize });
              model.createVolume(info.id, capacityBytes);
              return { model, real };
            }, cmds);
          } finally {
            await real.store.close();
            fs.rmSync(dir, { recursive: true, force: true });
          }
        },
      ),
      { numRuns: NUM_RUNS },
    );
  }, 600_000);
});
