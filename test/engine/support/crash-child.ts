/**
 * Child process of the crash test (test/engine/crash.test.ts): opens a block store and hammers it with a
 * seeded random stream of whole-block writes, trims, flushes, snapshot and group snapshot creations and
 * deletions (which leave change records behind, expire the oldest past the per-volume limit, and set
 * background compaction going) until the parent kills it with SIGKILL, or until it kills itself.
 *
 * Self-kill (config.selfKill): to land kills inside group snapshot creation and deletion and snapshot
 * deletion, which take a few milliseconds, the child counts the steps the engine takes (each SQLite
 * statement run, BEGIN and COMMIT included, and each synchronous file call) and, in the nth operation of
 * the chosen kind, SIGKILLs itself before a step chosen at random among as many as that kind took before.
 *
 * Run as `node --import tsx crash-child.ts <dir> <config-json>`.
 *
 * Protocol: one JSON line on stdout per event, written synchronously so that a line is in the pipe before
 * the operation it announces starts. `intent` precedes every operation and carries all of its parameters;
 * `ack` follows its successful return. The parent replays these lines into its model; nothing else the
 * child knows is trusted.
 *
 * Block content is derived from (write id, volume index, block index) only, and every 512-byte sector
 * repeats that header, so any block read back names the write that produced it and a torn block (sectors
 * of different writes, or data mixed with zeros) is recognised as garbage.
 */
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import { BlockStore } from '../../../storage-engine/index.js';
import { mulberry32 as prng } from '../../support/random.js';

export const BLOCK_SIZE = 4096;
const SECTOR = 512;
const HOT_ZONE_BLOCKS = 64;

/** One operation as announced by an intent line. Block ranges are in blocks, not bytes. */
export type CrashOp =
  | { op: 'write'; vol: number; block: number; count: number; writeId: number }
  | { op: 'trim'; vol: number; block: number; count: number }
  | { op: 'flush'; vol: number }
  | { op: 'snapshot'; vol: number; name: string }
  | { op: 'delete'; snapshotId: string; name: string }
  /** A group snapshot of these volumes (in this order); its members are unnamed. */
  | { op: 'group'; vols: number[]; name: string }
  | { op: 'deleteGroup'; groupId: string; name: string }
  | { op: 'compact' };

/** Operations the child can be told to kill itself inside. */
export type SelfKillOp = 'group' | 'deleteGroup' | 'delete';

/** A snapshot as the child saw it listed after opening the store. */
export interface ListedSnapshot {
  id: string;
  name: string | undefined;
  groupId: string | undefined;
  sourceVolumeId: string;
}

/** A group snapshot as the child saw it listed after opening the store. */
export interface ListedGroup {
  id: string;
  name: string | undefined;
  snapshotIds: string[];
}

/** Lines the child writes to stdout. */
export type ChildLine =
  | { t: 'open' }
  | { t: 'ready'; volumes: string[]; snapshots: ListedSnapshot[]; groups: ListedGroup[] }
  | { t: 'intent'; seq: number; op: CrashOp }
  | { t: 'ack'; seq: number; snapshotId?: string; groupId?: string; snapshotIds?: string[] }
  /** The child armed its self-kill: it dies before step `atStep` (of about `of`) of the operation announced last. */
  | { t: 'armed'; atStep: number; of: number }
  | { t: 'error'; message: string };

/** What the parent tells a child to do. */
export interface ChildConfig {
  seed: number;
  /** First write id this child may use; ids are unique across all children of one store. */
  firstWriteId: number;
  /** Prefix of the snapshot names this child creates (unique per child). */
  snapshotPrefix: string;
  /** Above this many snapshots on a volume, deleting one becomes much more likely. */
  maxSnapshotsPerVolume: number;
  /** The store's limit of usable change records (tombstones) per volume: deletes past it expire the oldest. */
  tombstonesPerVolume: number;
  /** Kill yourself inside the nth operation of this kind, before step ⌊fraction × steps such an operation takes⌋. */
  selfKill?: { op: SelfKillOp; nth: number; fraction: number };
}

/** Fixed non-zero filler shared by all blocks: only the sector headers tell writes apart. */
const FILLER: Buffer = (() => {
  const next = prng(0xc0ffee);
  const buf = Buffer.alloc(BLOCK_SIZE);
  for (let i = 0; i < BLOCK_SIZE; i++) buf[i] = 1 + Math.floor(next() * 255);
  return buf;
})();
const ZERO_BLOCK = Buffer.alloc(BLOCK_SIZE);

/** The exact bytes write `writeId` (>= 1) puts into block `block` of volume `vol`. */
export function blockContent(writeId: number, vol: number, block: number): Buffer {
  const buf = Buffer.from(FILLER);
  for (let s = 0; s < BLOCK_SIZE; s += SECTOR) {
    buf.writeUInt32LE(writeId, s);
    buf.writeUInt32LE(vol, s + 4);
    buf.writeUInt32LE(block, s + 8);
    buf.writeUInt32LE(s / SECTOR, s + 12);
  }
  return buf;
}

/**
 * What a block read back holds: 0 for zeros, the id of the write that produced it, or -1 when it is
 * neither (torn, foreign, or placed at the wrong block or volume).
 */
export function decodeBlock(data: Uint8Array, vol: number, block: number): number {
  const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (buf.equals(ZERO_BLOCK)) return 0;
  const writeId = buf.readUInt32LE(0);
  if (writeId === 0) return -1;
  return buf.equals(blockContent(writeId, vol, block)) ? writeId : -1;
}

/** The unwrapped writeSync: announcing an operation is not one of the engine's steps. */
const rawWriteSync = fs.writeSync;

function emit(line: ChildLine): void {
  const bytes = Buffer.from(`${JSON.stringify(line)}\n`);
  let done = 0;
  while (done < bytes.length) {
    try {
      done += rawWriteSync(1, bytes, done, bytes.length - done);
    } catch (err) {
      // The pipe may be non-blocking; spin until the parent drains it rather than lose an intent.
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
    }
  }
}

interface ChildSnapshot {
  id: string;
  name: string;
  /** Set for group members, which are deleted with their group only. */
  groupId?: string;
}

interface ChildGroup {
  id: string;
  name: string;
  vols: number[];
}

/** Counts the engine's steps (SQLite statement runs, synchronous file calls) and kills the process at one. */
class StepCounter {
  steps = 0;
  private killAt: number | undefined;

  constructor() {
    const onStep = (): void => this.step();
    const fsCalls = ['openSync', 'closeSync', 'writeSync', 'fsyncSync', 'fdatasyncSync', 'rmSync', 'renameSync'];
    const mutableFs = fs as unknown as Record<string, (...args: unknown[]) => unknown>;
    for (const name of fsCalls) {
      const original = mutableFs[name]!;
      mutableFs[name] = (...args: unknown[]) => {
        onStep();
        return original(...args);
      };
    }
    // Every prepared statement, BEGIN and COMMIT included, runs through Statement.prototype.run.
    const probe = new Database(':memory:');
    const statement = Object.getPrototypeOf(probe.prepare('SELECT 1')) as { run: (...args: unknown[]) => unknown };
    probe.close();
    const run = statement.run;
    statement.run = function (this: unknown, ...args: unknown[]) {
      onStep();
      return run.apply(this, args);
    };
  }

  /** One step: the process dies here if this is the step it was armed for. */
  step(): void {
    if (this.killAt !== undefined && this.steps >= this.killAt) process.kill(process.pid, 'SIGKILL');
    this.steps++;
  }

  /** Dies before the step `after` steps from now. */
  arm(after: number): void {
    this.killAt = this.steps + after;
  }
}

async function run(dir: string, config: ChildConfig): Promise<void> {
  const rand = prng(config.seed);
  const int = (lo: number, hi: number): number => lo + Math.floor(rand() * (hi - lo + 1));

  const counter = config.selfKill ? new StepCounter() : undefined;
  emit({ t: 'open' });
  const store = BlockStore.open(dir, {
    autoCompact: true,
    deletedSnapshotRetention: { maxPerVolume: config.tombstonesPerVolume },
  });
  const volumes = store.listVolumes();
  const listed = store.listSnapshots();
  const listedGroups = store.listGroupSnapshots();
  emit({
    t: 'ready',
    volumes: volumes.map((v) => v.id),
    snapshots: listed.map((s) => ({ id: s.id, name: s.name, groupId: s.groupId, sourceVolumeId: s.sourceVolumeId })),
    groups: listedGroups.map((g) => ({ id: g.id, name: g.name, snapshotIds: g.snapshots.map((s) => s.id) })),
  });

  // Per volume, the snapshots this child believes alive, oldest first.
  const snaps: ChildSnapshot[][] = volumes.map((v) =>
    listed.filter((s) => s.sourceVolumeId === v.id).map((s) => ({ id: s.id, name: s.name ?? '', groupId: s.groupId })),
  );
  const groups: ChildGroup[] = listedGroups.map((g) => ({
    id: g.id,
    name: g.name ?? '',
    vols: g.snapshots.map((s) => volumes.findIndex((v) => v.id === s.sourceVolumeId)),
  }));
  let seq = 0;
  let writeId = config.firstWriteId;
  let snapCount = 0;
  let groupCount = 0;
  // Self-kill: how many operations of the kind were seen, and the fewest steps one of them took (so the
  // chosen step falls inside the operation, not after it).
  const selfKill = config.selfKill;
  let seenOfKind = 0;
  let fewestSteps: number | undefined;
  const measure = async <T>(kind: CrashOp['op'], fn: () => Promise<T>): Promise<T> => {
    if (!counter || !selfKill || kind !== selfKill.op) return fn();
    if (++seenOfKind === selfKill.nth) {
      const of = fewestSteps ?? 4;
      const atStep = Math.floor(selfKill.fraction * of);
      emit({ t: 'armed', atStep, of });
      counter.arm(atStep);
    }
    const before = counter.steps;
    const result = await fn();
    // One more step once the operation returned and before its ack: committed, not yet acknowledged.
    counter.step();
    fewestSteps = Math.min(fewestSteps ?? Number.POSITIVE_INFINITY, counter.steps - before);
    return result;
  };
  // Half the children snapshot rarely, so heads live long and collect many flushed overwrites and trims
  // (what recovery must replay); the other half snapshot and delete often (what compaction must merge).
  const snapshotWeight = rand() < 0.5 ? 0.03 : 0.12;
  const pick = (weights: Record<CrashOp['op'], number>): CrashOp['op'] => {
    const entries = Object.entries(weights) as [CrashOp['op'], number][];
    let x = rand() * entries.reduce((sum, [, w]) => sum + w, 0);
    for (const [op, w] of entries) {
      x -= w;
      if (x < 0) return op;
    }
    return 'write';
  };

  const safetyStop = Date.now() + 60_000;
  while (Date.now() < safetyStop) {
    const vol = int(0, volumes.length - 1);
    const info = volumes[vol];
    const volSnaps = snaps[vol];
    if (info === undefined || volSnaps === undefined) throw new Error('volume list changed under the child');
    const blocks = info.capacityBytes / BLOCK_SIZE;
    // Most ranges land in a small hot zone, so writes, trims, flushes and merges keep meeting the same
    // blocks in the same layers (overwrite after flush, trim after write, merge under an override).
    const pickRange = (): { block: number; count: number } => {
      const count = int(1, 16);
      const limit = rand() < 0.6 ? Math.min(HOT_ZONE_BLOCKS, blocks) : blocks;
      return { block: int(0, Math.max(0, limit - count)), count };
    };
    // Deleting is forced up when a volume has too many snapshots, so the chain stays short. Never the
    // newest: deleting an older one leaves a hidden layer in the middle of the chain to merge. Group
    // members go with their group only.
    const deletable = volSnaps.slice(0, -1).filter((s) => s.groupId === undefined);
    const crowded = volSnaps.length > config.maxSnapshotsPerVolume;
    const weights: Record<CrashOp['op'], number> = {
      write: 0.5,
      trim: 0.17,
      flush: 0.15,
      snapshot: snapshotWeight,
      delete: deletable.length > 0 ? (crowded ? 0.4 : 0.08) : 0,
      group: snapshotWeight / 2,
      deleteGroup: groups.length > 0 ? (crowded || groups.length > 2 ? 0.3 : 0.05) : 0,
      compact: 0.02,
    };
    // A child told to kill itself inside an operation of some kind gets there sooner.
    if (selfKill) weights[selfKill.op] *= 3;
    const kind = pick(weights);
    const current = seq++;
    if (kind === 'delete') {
      const victim = deletable[int(0, deletable.length - 1)];
      if (victim === undefined) throw new Error('unreachable');
      volSnaps.splice(volSnaps.indexOf(victim), 1);
      emit({ t: 'intent', seq: current, op: { op: 'delete', snapshotId: victim.id, name: victim.name } });
      await measure(kind, () => store.deleteSnapshot(victim.id));
      emit({ t: 'ack', seq: current });
    } else if (kind === 'group') {
      // Any nonempty subset of the volumes, in a random order.
      const vols = volumes.map((_, i) => i).filter(() => rand() < 0.6);
      if (vols.length === 0) vols.push(vol);
      for (let i = vols.length - 1; i > 0; i--) {
        const j = int(0, i);
        [vols[i], vols[j]] = [vols[j]!, vols[i]!];
      }
      const name = `g-${config.snapshotPrefix}${groupCount++}`;
      emit({ t: 'intent', seq: current, op: { op: 'group', vols, name } });
      const group = await measure(kind, () =>
        store.createGroupSnapshot({ name, members: vols.map((v) => ({ volumeId: volumes[v]!.id })) }),
      );
      groups.push({ id: group.id, name, vols });
      for (const [i, member] of group.snapshots.entries()) {
        snaps[vols[i]!]!.push({ id: member.id, name: '', groupId: group.id });
      }
      emit({ t: 'ack', seq: current, groupId: group.id, snapshotIds: group.snapshots.map((m) => m.id) });
    } else if (kind === 'deleteGroup') {
      const victim = groups.splice(int(0, groups.length - 1), 1)[0];
      if (victim === undefined) throw new Error('unreachable');
      for (const list of snaps) {
        const at = list.findIndex((s) => s.groupId === victim.id);
        if (at >= 0) list.splice(at, 1);
      }
      emit({ t: 'intent', seq: current, op: { op: 'deleteGroup', groupId: victim.id, name: victim.name } });
      await measure(kind, () => store.deleteGroupSnapshot(victim.id));
      emit({ t: 'ack', seq: current });
    } else if (kind === 'write') {
      const { block, count } = pickRange();
      const id = writeId++;
      emit({ t: 'intent', seq: current, op: { op: 'write', vol, block, count, writeId: id } });
      const data = Buffer.alloc(count * BLOCK_SIZE);
      for (let i = 0; i < count; i++) blockContent(id, vol, block + i).copy(data, i * BLOCK_SIZE);
      store.write(info.id, block * BLOCK_SIZE, data);
      emit({ t: 'ack', seq: current });
    } else if (kind === 'trim') {
      const { block, count } = pickRange();
      emit({ t: 'intent', seq: current, op: { op: 'trim', vol, block, count } });
      store.trim(info.id, block * BLOCK_SIZE, count * BLOCK_SIZE);
      emit({ t: 'ack', seq: current });
    } else if (kind === 'flush') {
      emit({ t: 'intent', seq: current, op: { op: 'flush', vol } });
      await store.flush(info.id);
      emit({ t: 'ack', seq: current });
    } else if (kind === 'snapshot') {
      const name = `s-${config.snapshotPrefix}${snapCount++}`;
      emit({ t: 'intent', seq: current, op: { op: 'snapshot', vol, name } });
      const snap = await store.createSnapshot({ volumeId: info.id, name });
      volSnaps.push({ id: snap.id, name });
      emit({ t: 'ack', seq: current, snapshotId: snap.id });
    } else {
      emit({ t: 'intent', seq: current, op: { op: 'compact' } });
      await store.compact();
      emit({ t: 'ack', seq: current });
    }
    // Let background work (compaction, flush callbacks) interleave with the foreground operations.
    await new Promise((resolve) => setImmediate(resolve));
  }
  // The parent kills us long before this; ending on our own means it lost track of us.
  await store.close();
}

const invokedDirectly = process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href;
if (invokedDirectly) {
  const [dir, configJson] = process.argv.slice(2);
  if (dir === undefined || configJson === undefined) {
    process.stderr.write('usage: crash-child.ts <store-dir> <config-json>\n');
    process.exit(64);
  }
  run(dir, JSON.parse(configJson) as ChildConfig).then(
    () => process.exit(3),
    (err: unknown) => {
      emit({ t: 'error', message: err instanceof Error ? (err.stack ?? err.message) : String(err) });
      process.exit(2);
    },
  );
}

/** The same seed replays the same operation stream. */
export { prng };
