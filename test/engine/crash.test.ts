/**
 * kill -9 test of the block store (DESIGN.md invariants 1-5 under crashes).
 *
 * A child process (support/crash-child.ts) runs a seeded random stream of operations on one store and
 * announces each one on stdout before it starts (intent) and after it returns (ack). The parent kills it
 * with SIGKILL at a random moment, replays the announced operations into its own model, then reopens the
 * store and checks it against the model. Then a new child continues on the same, many-times-crashed store.
 *
 * The model keeps, for every block, the set of values it may hold: exactly one while the child runs,
 * more after a crash (the value at the last acknowledged flush or snapshot, or any value written or
 * trimmed by an intent after it, as a disk would). What the parent reads after a verified crash becomes
 * the new exact state. Some rounds skip the verification on purpose, so the next child has to recover a
 * dirty store itself (and may be killed while doing so); their uncertainty is carried forward.
 *
 * Group snapshots and change records (tombstones) are in the stream too: a group is whole or absent after
 * any kill (invariant 9), and a delta from a deleted snapshot answers as if it still existed while its
 * record is usable, or FAILED_PRECONDITION once the per-volume limit expired it (invariant 8). Part of the
 * rounds kill inside CreateGroupSnapshot, DeleteGroupSnapshot or DeleteSnapshot: the child kills itself
 * before a random step of the nth such operation (crash-child.ts).
 *
 * CBT_CRASH_KILLS sets the number of kills (default 50 when CI=true, else 20); CBT_CRASH_SEED replays a
 * run's operation streams (kill timing stays wall-clock); CBT_CRASH_KEEP=1 keeps the store directory and
 * writes every child's lines next to it (<dir>.log).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockStore } from '../../storage-engine/index.js';
import type { ExtentStream } from '../../storage-engine/index.js';
import { HistoryGoneError } from '../../storage-engine/errors.js';
import type { Extent } from '../../storage-engine/types.js';
import { extentShapeViolation } from './support/block-model.js';
import {
  BLOCK_SIZE,
  decodeBlock,
  prng,
  type ChildConfig,
  type ChildLine,
  type CrashOp,
  type ListedGroup,
  type ListedSnapshot,
  type SelfKillOp,
} from './support/crash-child.js';

const KILLS = Number(process.env.CBT_CRASH_KILLS ?? (process.env.CI === 'true' ? 50 : 20));
const SEED = Number(process.env.CBT_CRASH_SEED ?? Math.floor(Math.random() * 2 ** 31));
const VOLUME_BLOCKS = [1024, 256, 128];
const MAX_SNAPSHOTS_PER_VOLUME = 5;
/** Usable change records per volume: small, so deletes keep expiring the oldest. */
const TOMBSTONES_PER_VOLUME = 3;
/** Rounds whose kill the child makes itself, inside a group create/delete or a snapshot delete: 3 of every 5. */
const isSelfKillRound = (round: number): boolean => [1, 2, 4].includes(round % 5);
const SELF_KILL_OPS: readonly SelfKillOp[] = ['group', 'deleteGroup', 'delete'];
/** Share of rounds whose crash is left for the next child to recover, unverified. */
const UNVERIFIED_SHARE = 0.25;
/** Share of kills aimed at the child's start-up (open and recovery) rather than its operations. */
const KILL_AT_OPEN_SHARE = 0.15;

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '../..');
const childScript = path.join(here, 'support', 'crash-child.ts');

/** Possible values of one block: 0 for zeros, otherwise the id of the write whose content it holds. */
type Candidates = readonly number[];

interface Touch {
  seq: number;
  first: number;
  count: number;
  /** A flush or snapshot of its volume was acknowledged after it: its bits are committed. */
  durable: boolean;
}

class VolumeModel {
  /** What each block may hold now. */
  cur: Candidates[];
  /** What each block may hold as of the last acknowledged flush or snapshot. */
  dur: Candidates[];
  /** Values given to each block by intents since then: any of them may have reached the disk. */
  pending: number[][];
  /** Every write and trim intent, in order: delta(A, B) may only report blocks touched between A and B. */
  readonly touches: Touch[] = [];
  /** Touches from here on are not known committed; those before it that are not, never will be known. */
  private uncommittedFrom = 0;

  constructor(
    readonly index: number,
    readonly id: string,
    readonly blocks: number,
  ) {
    this.cur = Array.from({ length: blocks }, () => [0]);
    this.dur = this.cur.slice();
    this.pending = Array.from({ length: blocks }, () => []);
  }

  assign(first: number, count: number, value: number, seq: number): void {
    if (!Number.isInteger(first) || !Number.isInteger(count) || first < 0 || count < 1 || first + count > this.blocks) {
      throw new Error(`child announced an out-of-range operation on volume ${this.index}: ${first}+${count}`);
    }
    for (let b = first; b < first + count; b++) {
      this.cur[b] = [value];
      this.pending[b]?.push(value);
    }
    this.touches.push({ seq, first, count, durable: false });
  }

  /** A flush or snapshot of this volume was acknowledged: every touch since the last kill is committed. */
  touchesCommitted(): void {
    for (let i = this.uncommittedFrom; i < this.touches.length; i++) this.touches[i]!.durable = true;
    this.uncommittedFrom = this.touches.length;
  }

  markDurable(): void {
    this.dur = this.cur.slice();
    this.pending = Array.from({ length: this.blocks }, () => []);
  }

  /** After a kill, each block holds its durable value or any value announced since. */
  crash(): void {
    this.cur = this.cur.map((_, b) => [...new Set([...(this.dur[b] ?? []), ...(this.pending[b] ?? [])])]);
    this.markDurable();
    // Whether the bits of uncommitted touches survived is unknown: a later flush does not commit them.
    this.uncommittedFrom = this.touches.length;
  }

  /** The store showed these values (or a snapshot pins them): they are now the exact state. */
  pin(values: readonly Candidates[]): void {
    this.cur = values.slice();
    this.markDurable();
  }

  /** Blocks written or trimmed between two sequence points (only committed touches, if asked). */
  touchedBetween(afterSeq: number, uptoSeq: number, committedOnly = false): Set<number> {
    const blocks = new Set<number>();
    for (const t of this.touches) {
      if (committedOnly && !t.durable) continue;
      if (t.seq > afterSeq && t.seq < uptoSeq) for (let b = t.first; b < t.first + t.count; b++) blocks.add(b);
    }
    return blocks;
  }
}

interface SnapshotModel {
  /** Its name; group members, which have none in the store, are `<group name>#<volume index>`. */
  name: string;
  id: string | undefined;
  vol: number;
  /** The name of the group it was taken in. */
  group: string | undefined;
  /** Sequence number of its creating intent, on the same clock as the volume's touches. */
  seq: number;
  /** What each block must read (one candidate once a read pinned it). */
  content: Candidates[];
  /**
   * alive: must exist; maybe: create or delete was in flight at a kill; deleted: must not exist, and left a
   * change record; never: its creation was in flight at a kill and did not happen.
   */
  status: 'alive' | 'maybe' | 'deleted' | 'never';
  /** Its creation was in flight at a kill: if it exists, the volume was flushed up to it. */
  createInFlight: boolean;
  /** Its change record once deleted: usable until the per-volume limit expires it. */
  record: 'usable' | 'expired' | undefined;
}

interface GroupModel {
  name: string;
  id: string | undefined;
  /** Volume indexes of its members, in member order. */
  vols: number[];
  /** Model names of its member snapshots, in member order. */
  members: string[];
  status: 'alive' | 'maybe' | 'deleted' | 'never';
  createInFlight: boolean;
}

class StoreModel {
  seq = 0;
  readonly volumes: VolumeModel[] = [];
  /** By name, in creation (intent) order. */
  readonly snapshots = new Map<string, SnapshotModel>();
  /** By name, in creation (intent) order. */
  readonly groups = new Map<string, GroupModel>();
  /** Per volume index, deleted snapshots in deletion order: their change records. */
  readonly records = new Map<number, SnapshotModel[]>();
  readonly failures: string[] = [];

  fail(message: string): void {
    if (this.failures.length < 40) this.failures.push(message);
  }

  volume(index: number): VolumeModel {
    const vm = this.volumes[index];
    if (vm === undefined) throw new Error(`child named unknown volume index ${index}`);
    return vm;
  }

  /** Deleting snapshots (in one transaction) leaves a record each; the oldest usable past the limit expire. */
  private retire(snaps: readonly SnapshotModel[]): void {
    for (const m of snaps) {
      m.status = 'deleted';
      m.record = 'usable';
      const list = this.records.get(m.vol) ?? [];
      list.push(m);
      this.records.set(m.vol, list);
    }
    for (const vol of new Set(snaps.map((m) => m.vol))) {
      const usable = (this.records.get(vol) ?? []).filter((m) => m.record === 'usable');
      for (const m of usable.slice(0, Math.max(0, usable.length - TOMBSTONES_PER_VOLUME))) m.record = 'expired';
    }
  }

  /** Checks a listing of the store against the model and learns which in-flight operations happened. */
  observeListing(
    volumeIds: readonly string[],
    listed: readonly ListedSnapshot[],
    listedGroups: readonly ListedGroup[],
    when: string,
  ): void {
    const expectedIds = this.volumes.map((v) => v.id);
    if (JSON.stringify(volumeIds) !== JSON.stringify(expectedIds)) {
      this.fail(`${when}: volumes ${JSON.stringify(volumeIds)}, expected ${JSON.stringify(expectedIds)}`);
    }
    const listedById = new Map(listed.map((s) => [s.id, s]));
    // Groups first: a group is whole (every member listed, in its group, of the right volume) or absent.
    const memberName = new Map<string, string>();
    const seenGroups = new Set<string>();
    for (const g of listedGroups) {
      const m = g.name === undefined ? undefined : this.groups.get(g.name);
      if (m === undefined) {
        this.fail(`${when}: group snapshot ${g.id} (${String(g.name)}) was never created`);
        continue;
      }
      seenGroups.add(m.name);
      if (m.status === 'deleted') this.fail(`${when}: group ${m.name} came back after its deletion was acknowledged`);
      if (m.id !== undefined && m.id !== g.id) this.fail(`${when}: group ${m.name} has id ${g.id}, was ${m.id}`);
      if (g.snapshotIds.length !== m.vols.length) {
        this.fail(`${when}: group ${m.name} has ${g.snapshotIds.length} members, created with ${m.vols.length}`);
        continue;
      }
      for (const [i, id] of g.snapshotIds.entries()) {
        const s = listedById.get(id);
        if (s === undefined) this.fail(`${when}: group ${m.name} is not whole: member ${id} is not listed`);
        else if (s.groupId !== g.id) this.fail(`${when}: member ${id} of group ${m.name} names group ${s.groupId}`);
        memberName.set(id, m.members[i]!);
      }
      m.id = g.id;
      if (m.status === 'maybe') m.status = 'alive';
      m.createInFlight = false;
    }
    const seen = new Set<string>();
    for (const s of listed) {
      const name = s.groupId === undefined ? s.name : memberName.get(s.id);
      if (s.groupId !== undefined && name === undefined) {
        this.fail(`${when}: snapshot ${s.id} belongs to group ${s.groupId}, which is not listed (not whole)`);
        continue;
      }
      const m = name === undefined ? undefined : this.snapshots.get(name);
      if (m === undefined) {
        this.fail(`${when}: snapshot ${s.id} (${String(s.name)}) was never created`);
        continue;
      }
      seen.add(m.name);
      if (m.status === 'deleted')
        this.fail(`${when}: snapshot ${m.name} came back after its deletion was acknowledged`);
      if (m.id !== undefined && m.id !== s.id) this.fail(`${when}: snapshot ${m.name} has id ${s.id}, was ${m.id}`);
      if (s.sourceVolumeId !== this.volume(m.vol).id) this.fail(`${when}: snapshot ${m.name} names the wrong volume`);
      m.id = s.id;
      if (m.status === 'maybe') m.status = 'alive';
      if (m.createInFlight) {
        m.createInFlight = false;
        // It was the last operation before the kill and it froze the flushed head: the volume reads as it.
        this.volume(m.vol).pin(m.content);
      }
    }
    // What is absent: acknowledged ones are failures; in-flight ones are settled (never made, or deleted).
    const retiring: SnapshotModel[] = [];
    for (const m of this.snapshots.values()) {
      if (seen.has(m.name)) continue;
      if (m.status === 'alive') this.fail(`${when}: acknowledged snapshot ${m.name} (${String(m.id)}) is missing`);
      if (m.status === 'maybe') {
        if (m.createInFlight) m.status = 'never';
        else retiring.push(m);
      }
      m.createInFlight = false;
    }
    if (retiring.length > 0) this.retire(retiring);
    for (const m of this.groups.values()) {
      if (seenGroups.has(m.name)) continue;
      if (m.status === 'alive') this.fail(`${when}: acknowledged group ${m.name} (${String(m.id)}) is missing`);
      if (m.status === 'maybe') m.status = m.createInFlight ? 'never' : 'deleted';
      m.createInFlight = false;
    }
  }

  /** Replays one child's announcements; the child was killed after the last of them. */
  applyRun(lines: readonly ChildLine[]): { inFlight: CrashOp['op'] | 'open' | 'between ops'; armed: boolean } {
    let open: { seq: number; op: CrashOp; global: number } | undefined;
    let sawOpen = false;
    let sawReady = false;
    let armed = false;
    for (const line of lines) {
      switch (line.t) {
        case 'open':
          sawOpen = true;
          break;
        case 'ready':
          sawReady = true;
          this.observeListing(line.volumes, line.snapshots, line.groups, 'child listing after reopen');
          break;
        case 'armed':
          armed = true;
          break;
        case 'error':
          this.fail(`child failed: ${line.message}`);
          break;
        case 'intent': {
          if (open !== undefined) throw new Error(`intent ${line.seq} while ${open.seq} is unacknowledged`);
          open = { seq: line.seq, op: line.op, global: this.seq++ };
          this.applyIntent(line.op, open.global);
          break;
        }
        case 'ack': {
          if (open === undefined || open.seq !== line.seq) throw new Error(`ack ${line.seq} without its intent`);
          this.applyAck(open.op, line);
          open = undefined;
          break;
        }
      }
    }
    for (const vm of this.volumes) vm.crash();
    // 'between ops' is mostly background compaction, which runs while the child yields between operations.
    return { inFlight: open?.op.op ?? (sawOpen && !sawReady ? 'open' : 'between ops'), armed };
  }

  private newSnapshot(name: string, vol: number, group: string | undefined, seq: number): void {
    if (this.snapshots.has(name)) throw new Error(`snapshot name ${name} reused`);
    this.snapshots.set(name, {
      name,
      id: undefined,
      vol,
      group,
      seq,
      content: this.volume(vol).cur.slice(),
      status: 'maybe',
      createInFlight: true,
      record: undefined,
    });
  }

  private applyIntent(op: CrashOp, seq: number): void {
    switch (op.op) {
      case 'write':
        if (op.writeId < 1) throw new Error('write ids start at 1');
        this.volume(op.vol).assign(op.block, op.count, op.writeId, seq);
        break;
      case 'trim':
        this.volume(op.vol).assign(op.block, op.count, 0, seq);
        break;
      case 'snapshot':
        this.newSnapshot(op.name, op.vol, undefined, seq);
        break;
      case 'group': {
        if (this.groups.has(op.name)) throw new Error(`group name ${op.name} reused`);
        const members = op.vols.map((v) => `${op.name}#${v}`);
        for (const [i, v] of op.vols.entries()) this.newSnapshot(members[i]!, v, op.name, seq);
        this.groups.set(op.name, {
          name: op.name,
          id: undefined,
          vols: [...op.vols],
          members,
          status: 'maybe',
          createInFlight: true,
        });
        break;
      }
      case 'delete': {
        const m = this.snapshots.get(op.name);
        if (m === undefined || m.status !== 'alive') {
          this.fail(`child deletes snapshot ${op.name}, which the model does not know alive`);
          break;
        }
        if (m.id !== op.snapshotId)
          this.fail(`child deletes ${op.name} as ${op.snapshotId}, but it is ${String(m.id)}`);
        m.status = 'maybe';
        break;
      }
      case 'deleteGroup': {
        const g = this.groups.get(op.name);
        if (g === undefined || g.status !== 'alive') {
          this.fail(`child deletes group ${op.name}, which the model does not know alive`);
          break;
        }
        if (g.id !== op.groupId)
          this.fail(`child deletes group ${op.name} as ${op.groupId}, but it is ${String(g.id)}`);
        g.status = 'maybe';
        for (const name of g.members) this.snapshots.get(name)!.status = 'maybe';
        break;
      }
      case 'flush':
      case 'compact':
        break;
    }
  }

  private applyAck(op: CrashOp, ack: Extract<ChildLine, { t: 'ack' }>): void {
    switch (op.op) {
      case 'flush':
        this.volume(op.vol).markDurable();
        this.volume(op.vol).touchesCommitted();
        break;
      case 'snapshot': {
        const m = this.snapshots.get(op.name);
        if (m === undefined || ack.snapshotId === undefined) throw new Error(`snapshot ack without id for ${op.name}`);
        m.status = 'alive';
        m.createInFlight = false;
        m.id = ack.snapshotId;
        this.volume(op.vol).markDurable();
        this.volume(op.vol).touchesCommitted();
        break;
      }
      case 'group': {
        const g = this.groups.get(op.name);
        if (g === undefined || ack.groupId === undefined || ack.snapshotIds?.length !== op.vols.length) {
          throw new Error(`group ack without its id and members for ${op.name}`);
        }
        g.status = 'alive';
        g.createInFlight = false;
        g.id = ack.groupId;
        for (const [i, name] of g.members.entries()) {
          const m = this.snapshots.get(name)!;
          m.status = 'alive';
          m.createInFlight = false;
          m.id = ack.snapshotIds[i];
          this.volume(m.vol).markDurable();
          this.volume(m.vol).touchesCommitted();
        }
        break;
      }
      case 'delete': {
        const m = this.snapshots.get(op.name);
        if (m !== undefined) this.retire([m]);
        break;
      }
      case 'deleteGroup': {
        const g = this.groups.get(op.name);
        if (g === undefined) break;
        g.status = 'deleted';
        this.retire(g.members.map((name) => this.snapshots.get(name)!));
        break;
      }
      case 'write':
      case 'trim':
      case 'compact':
        break;
    }
  }
}

function describeCandidates(c: Candidates | undefined): string {
  return c === undefined ? '(none)' : `{${c.slice(0, 8).join(',')}${c.length > 8 ? ',...' : ''}}`;
}

function decodeAll(data: Buffer, vol: number, blocks: number): number[] {
  const values: number[] = [];
  for (let b = 0; b < blocks; b++)
    values.push(decodeBlock(data.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE), vol, b));
  return values;
}

/** Compares what was read with what the model allows; returns how many blocks broke the rule. */
function checkContent(
  model: StoreModel,
  what: string,
  read: readonly number[],
  allowed: readonly Candidates[],
): number {
  let bad = 0;
  for (const [b, value] of read.entries()) {
    const ok = allowed[b]?.includes(value) ?? false;
    if (ok) continue;
    if (bad++ < 3) {
      const seen = value === -1 ? 'garbage (torn or foreign bytes)' : value === 0 ? 'zeros' : `write #${value}`;
      model.fail(`${what}: block ${b} reads ${seen}, allowed ${describeCandidates(allowed[b])}`);
    }
  }
  if (bad > 3) model.fail(`${what}: ${bad} blocks wrong in all`);
  return bad;
}

async function extentBlocks(
  stream: ExtentStream,
  capacityBytes: number,
  what: string,
  model: StoreModel,
): Promise<Set<number>> {
  const extents: Extent[] = [];
  for await (const batch of stream) extents.push(...batch);
  const shape = extentShapeViolation(extents, BLOCK_SIZE, 'VARIABLE', capacityBytes, 0);
  if (shape !== undefined) model.fail(`${what}: ${shape}`);
  const blocks = new Set<number>();
  for (const e of extents) for (let o = e.offset; o < e.offset + e.length; o += BLOCK_SIZE) blocks.add(o / BLOCK_SIZE);
  return blocks;
}

const CATALOG_FILES = ['catalog.db', 'catalog.db-wal', 'catalog.db-shm', 'store.lock', 'space.reserve'];

/**
 * Reads a private copy of the catalog (and its WAL, which the copy replays), so the store directory is left
 * exactly as the kill left it: the layer files it references, and every way its rows fail to agree.
 */
function readCatalog(dir: string): { layerFiles: Set<string>; problems: string[] } {
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-crash-catalog-'));
  try {
    for (const f of ['catalog.db', 'catalog.db-wal']) {
      if (fs.existsSync(path.join(dir, f))) fs.copyFileSync(path.join(dir, f), path.join(scratch, f));
    }
    const db = new Database(path.join(scratch, 'catalog.db'));
    try {
      const rows = db.prepare('SELECT id FROM layers').all() as { id: number }[];
      const problems: string[] = [];
      const ask = (sql: string, what: (row: Record<string, unknown>) => string) => {
        for (const row of db.prepare(sql).all() as Record<string, unknown>[]) problems.push(what(row));
      };
      // Invariant 9: a group is whole or absent.
      ask(
        'SELECT m.snapshot_id, m.group_id FROM snapshot_group_members m LEFT JOIN snapshots s ON s.id = m.snapshot_id WHERE s.id IS NULL',
        (r) => `group ${String(r.group_id)} names member ${String(r.snapshot_id)}, which is not a snapshot`,
      );
      ask(
        'SELECT m.snapshot_id, m.group_id FROM snapshot_group_members m LEFT JOIN snapshot_groups g ON g.id = m.group_id WHERE g.id IS NULL',
        (r) => `snapshot ${String(r.snapshot_id)} is a member of group ${String(r.group_id)}, which does not exist`,
      );
      ask(
        'SELECT g.id FROM snapshot_groups g LEFT JOIN snapshot_group_members m ON m.group_id = g.id WHERE m.group_id IS NULL',
        (r) => `group ${String(r.id)} has no members`,
      );
      // Invariant 8: a change record anchors at a layer that exists, and only a deleted snapshot has one.
      ask(
        'SELECT t.snapshot_id, t.anchor_layer_id FROM tombstones t LEFT JOIN layers l ON l.id = t.anchor_layer_id WHERE l.id IS NULL',
        (r) =>
          `the change record of ${String(r.snapshot_id)} anchors at layer ${String(r.anchor_layer_id)}, which does not exist`,
      );
      ask(
        'SELECT t.snapshot_id FROM tombstones t JOIN snapshots s ON s.id = t.snapshot_id',
        (r) => `snapshot ${String(r.snapshot_id)} is alive and has a change record`,
      );
      ask(
        'SELECT s.id, s.layer_id FROM snapshots s LEFT JOIN layers l ON l.id = s.layer_id WHERE l.id IS NULL',
        (r) => `snapshot ${String(r.id)} names layer ${String(r.layer_id)}, which does not exist`,
      );
      return { layerFiles: new Set(rows.map((r) => `${r.id}.layer`)), problems };
    } finally {
      db.close();
    }
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

/** Invariants 5, 8 and 9, any time: every layer the catalog names has its file; groups and records agree. */
function checkCatalog(dir: string, model: StoreModel, when: string): void {
  const present = new Set(fs.readdirSync(path.join(dir, 'layers')));
  const { layerFiles, problems } = readCatalog(dir);
  for (const f of layerFiles) {
    if (!present.has(f)) model.fail(`${when}: the catalog references layers/${f}, which does not exist`);
  }
  for (const p of problems) model.fail(`${when}: ${p}`);
}

/** Invariant 5 after a clean open and close: the files are exactly the catalog's, and nothing else. */
function checkNoOrphans(dir: string, model: StoreModel): void {
  for (const entry of fs.readdirSync(dir)) {
    if (entry !== 'layers' && !CATALOG_FILES.includes(entry))
      model.fail(`unexpected entry ${entry} in the store directory`);
  }
  const referenced = readCatalog(dir).layerFiles;
  for (const f of fs.readdirSync(path.join(dir, 'layers'))) {
    if (!referenced.has(f)) model.fail(`orphan file layers/${f} survived open and close`);
  }
  checkCatalog(dir, model, 'after close');
}

/** Both pinned to one value, and different: the blocks a delta must report whatever else it does. */
function surelyDiffer(a: Candidates | undefined, b: Candidates | undefined): boolean {
  return a?.length === 1 && b?.length === 1 && a[0] !== b[0];
}

/**
 * Invariant 1 (and 8 for a deleted base): delta(base, target) reports every block that surely differs and
 * every block a committed write or trim touched in between, and nothing no write or trim touched.
 */
async function checkDelta(
  store: BlockStore,
  model: StoreModel,
  vm: VolumeModel,
  base: SnapshotModel,
  target: SnapshotModel,
): Promise<void> {
  const what = `delta(${base.status === 'deleted' ? 'deleted ' : ''}${base.name}, ${target.name}) of volume ${vm.index}`;
  const delta = await extentBlocks(store.delta(base.id ?? '', target.id ?? ''), vm.blocks * BLOCK_SIZE, what, model);
  for (let blk = 0; blk < vm.blocks; blk++) {
    if (surelyDiffer(base.content[blk], target.content[blk]) && !delta.has(blk)) {
      const change = `${describeCandidates(base.content[blk])} to ${describeCandidates(target.content[blk])}`;
      model.fail(`${what} misses block ${blk}, which changed from ${change}`);
      break;
    }
  }
  const committed = [...vm.touchedBetween(base.seq, target.seq, true)].filter((blk) => !delta.has(blk));
  if (committed.length > 0) {
    model.fail(`${what} misses blocks ${committed.slice(0, 8).join(',')}, written or trimmed and committed in between`);
  }
  const touched = vm.touchedBetween(base.seq, target.seq);
  const extra = [...delta].filter((blk) => !touched.has(blk));
  if (extra.length > 0) {
    const history = vm.touches
      .filter((t) => extra.some((b) => b >= t.first && b < t.first + t.count))
      .map((t) => `#${t.seq}${t.durable ? '' : '?'}`)
      .join(' ');
    model.fail(
      `${what} reports blocks ${extra.slice(0, 8).join(',')} that no write or trim touched in between ` +
        `(base #${base.seq}, target #${target.seq}; touches of those blocks: ${history})`,
    );
  }
}

/** Invariant 2 for allocated() and invariants 1 and 8 for delta(), on every surviving snapshot of a volume. */
async function checkExtentQueries(store: BlockStore, model: StoreModel, vm: VolumeModel): Promise<void> {
  const byId = new Map([...model.snapshots.values()].map((m) => [m.id, m]));
  const listed = store.listSnapshots({ sourceVolumeId: vm.id }).map((s) => byId.get(s.id));
  const alive = [...model.snapshots.values()].filter((m) => m.vol === vm.index && m.status === 'alive');
  if (listed.length !== alive.length || listed.some((m, i) => m !== alive[i])) {
    model.fail(
      `volume ${vm.index}: listSnapshots gives ${listed.map((m) => m?.name).join(',')}, not the creation order`,
    );
    return;
  }
  const capacity = vm.blocks * BLOCK_SIZE;
  for (const s of alive) {
    const allocated = await extentBlocks(store.allocated(s.id ?? ''), capacity, `allocated(${s.name})`, model);
    // Every write puts non-zero bytes, so a block is allocated exactly when it reads non-zero.
    for (const [b, c] of s.content.entries()) {
      const nonZero = c[0] !== 0;
      if (nonZero !== allocated.has(b)) {
        const reads = nonZero ? `write #${String(c[0])}` : 'zeros';
        model.fail(`allocated(${s.name}) ${nonZero ? 'misses' : 'reports'} block ${b}, which reads ${reads}`);
        break;
      }
    }
  }
  const pairs: [SnapshotModel, SnapshotModel][] = [];
  for (let i = 1; i < alive.length; i++) pairs.push([alive[i - 1] as SnapshotModel, alive[i] as SnapshotModel]);
  if (alive.length > 2) pairs.push([alive[0] as SnapshotModel, alive[alive.length - 1] as SnapshotModel]);
  for (const [a, b] of pairs) await checkDelta(store, model, vm, a, b);

  // Deleted bases: every later live snapshot, through the change record while it is usable.
  for (const base of model.records.get(vm.index) ?? []) {
    for (const target of alive.filter((t) => t.seq > base.seq)) {
      if (base.record === 'usable') {
        await checkDelta(store, model, vm, base, target);
        continue;
      }
      let error: unknown;
      try {
        store.delta(base.id ?? '', target.id ?? '');
      } catch (err) {
        error = err;
      }
      if (!(error instanceof HistoryGoneError)) {
        model.fail(
          `delta(deleted ${base.name}, ${target.name}): its change record expired (past ${TOMBSTONES_PER_VOLUME} ` +
            `a volume), so HistoryGoneError (FAILED_PRECONDITION) is due, got ${String(error ?? 'an answer')}`,
        );
      }
    }
  }
}

/** Reopens the crashed store in this process and checks everything the model knows. */
async function verify(dir: string, model: StoreModel, round: number): Promise<void> {
  checkCatalog(dir, model, 'right after the kill');
  // Opening a store whose catalog lost a file would only throw; the failure above says more.
  if (model.failures.length > 0) return;
  const store = BlockStore.open(dir, { deletedSnapshotRetention: { maxPerVolume: TOMBSTONES_PER_VOLUME } });
  try {
    model.observeListing(
      store.listVolumes().map((v) => v.id),
      store.listSnapshots(),
      store.listGroupSnapshots().map((g) => ({ id: g.id, name: g.name, snapshotIds: g.snapshots.map((m) => m.id) })),
      'after reopen',
    );
    for (const vm of model.volumes) {
      const read = decodeAll(store.read(vm.id, 0, vm.blocks * BLOCK_SIZE), vm.index, vm.blocks);
      checkContent(model, `volume ${vm.index}`, read, vm.cur);
      vm.pin(read.map((v) => [v]));
    }
    for (const m of model.snapshots.values()) {
      if (m.status !== 'alive' || m.id === undefined) continue;
      const vm = model.volume(m.vol);
      const read = decodeAll(store.readSnapshot(m.id, 0, vm.blocks * BLOCK_SIZE), vm.index, vm.blocks);
      checkContent(model, `snapshot ${m.name} of volume ${vm.index}`, read, m.content);
      m.content = read.map((v) => [v]);
    }
    // A snapshot of the recovered volume puts the recovered head under the delta checks too.
    for (const vm of model.volumes) {
      const name = `v-${round}-${vm.index}`;
      const seq = model.seq++;
      const info = await store.createSnapshot({ volumeId: vm.id, name });
      const content = vm.cur.slice();
      model.snapshots.set(name, {
        name,
        id: info.id,
        vol: vm.index,
        group: undefined,
        seq,
        content,
        status: 'alive',
        createInFlight: false,
        record: undefined,
      });
    }
    for (const vm of model.volumes) await checkExtentQueries(store, model, vm);
  } finally {
    await store.close();
  }
  checkNoOrphans(dir, model);
}

interface ChildRun {
  lines: ChildLine[];
  stderr: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  killedAfterMs: number | undefined;
  /** It never announced the moment the kill was keyed to (open hung, or the child died first). */
  stalled: boolean;
}

const liveChildren = new Set<ReturnType<typeof spawn>>();

/** How a round's child dies: SIGKILL from here `delayMs` after it announces `trigger`, or by its own hand. */
type KillPlan = { by: 'parent'; trigger: 'open' | 'ready'; delayMs: number } | { by: 'self' };

/** Starts a child on the store and lets it be killed as planned (the watchdog kills it after 30 s anyway). */
function runChild(dir: string, config: ChildConfig, plan: KillPlan): Promise<ChildRun> {
  const trigger = plan.by === 'parent' ? plan.trigger : 'ready';
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', childScript, dir, JSON.stringify(config)], {
      cwd: repoRoot,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    liveChildren.add(child);
    let stdout = '';
    let stderr = '';
    let startedAt: number | undefined;
    let killedAfterMs: number | undefined;
    let scanned = 0;
    let stalled = false;
    const kill = (): void => {
      if (startedAt !== undefined) killedAfterMs = Date.now() - startedAt;
      child.kill('SIGKILL');
    };
    // A child that never gets going must not hang the test.
    const watchdog = setTimeout(() => {
      stalled = startedAt === undefined;
      kill();
    }, 30_000);
    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      stdout += chunk;
      if (startedAt !== undefined) return;
      const marker = trigger === 'open' ? '{"t":"open"}' : '{"t":"ready"';
      if (stdout.indexOf(marker, Math.max(0, scanned - marker.length)) >= 0) {
        startedAt = Date.now();
        if (plan.by === 'parent') setTimeout(kill, plan.delayMs);
      }
      scanned = stdout.length;
    });
    child.stderr.on('data', (chunk: string) => {
      stderr += chunk;
    });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(watchdog);
      if (killedAfterMs === undefined && startedAt !== undefined) killedAfterMs = Date.now() - startedAt;
      liveChildren.delete(child);
      // Only whole lines count: the kill may cut the last one short.
      const complete = stdout.slice(0, stdout.lastIndexOf('\n') + 1);
      const lines = complete
        .split('\n')
        .filter((l) => l.length > 0)
        .map((l) => JSON.parse(l) as ChildLine);
      resolve({ lines, stderr, code, signal, killedAfterMs, stalled: stalled || startedAt === undefined });
    });
  });
}

const dirs: string[] = [];
afterAll(() => {
  for (const child of liveChildren) child.kill('SIGKILL');
  if (process.env.CBT_CRASH_KEEP === undefined) for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

describe('block store under kill -9', () => {
  it(`keeps flushed writes, acknowledged snapshots, whole groups, deltas from deleted bases and exactly its own files across ${KILLS} kills at random moments`, async () => {
    const started = Date.now();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-crash-'));
    dirs.push(dir);
    const rand = prng(SEED);
    const model = new StoreModel();

    const setup = BlockStore.open(dir);
    try {
      for (const [i, blocks] of VOLUME_BLOCKS.entries()) {
        const info = await setup.createVolume({
          name: `crash-${i}`,
          capacityBytes: blocks * BLOCK_SIZE,
          blockSize: BLOCK_SIZE,
        });
        model.volumes.push(new VolumeModel(i, info.id, blocks));
      }
    } finally {
      await setup.close();
    }

    const inFlightAtKill = new Map<string, number>();
    let operations = 0;
    let verified = 0;
    let selfKills = 0;
    for (let round = 0; round < KILLS; round++) {
      const config: ChildConfig = {
        seed: Math.floor(rand() * 2 ** 31),
        firstWriteId: round * 1_000_000 + 1,
        snapshotPrefix: `${round}-`,
        maxSnapshotsPerVolume: MAX_SNAPSHOTS_PER_VOLUME,
        tombstonesPerVolume: TOMBSTONES_PER_VOLUME,
      };
      let plan: KillPlan;
      if (isSelfKillRound(round)) {
        plan = { by: 'self' };
        const op = SELF_KILL_OPS[Math.floor(rand() * SELF_KILL_OPS.length)]!;
        config.selfKill = { op, nth: 1 + Math.floor(rand() * 3), fraction: rand() };
      } else {
        const atOpen = rand() < KILL_AT_OPEN_SHARE;
        const delayMs = atOpen ? Math.floor(rand() * 20) : 30 + Math.floor(rand() * 571);
        plan = { by: 'parent', trigger: atOpen ? 'open' : 'ready', delayMs };
      }
      const atOpen = plan.by === 'parent' && plan.trigger === 'open';
      const run = await runChild(dir, config, plan);
      const context =
        `seed ${SEED} (CBT_CRASH_SEED), round ${round}, child seed ${config.seed}, store ${dir} (CBT_CRASH_KEEP=1 keeps it), ` +
        (plan.by === 'self'
          ? `killed itself in ${JSON.stringify(config.selfKill)}, ${String(run.killedAfterMs)} ms after ready`
          : `killed ${String(run.killedAfterMs)} ms after ${plan.trigger}`);
      const tailOf = (lines: readonly ChildLine[]): string =>
        lines
          .slice(-6)
          .map((l) => JSON.stringify(l))
          .join('\n');
      expect(
        run.stalled,
        `${context}: child never reached ${atOpen ? 'open' : 'ready'}:\n${tailOf(run.lines)}\n${run.stderr}`,
      ).toBe(false);
      expect(run.signal, `${context}: child ended on its own (code ${String(run.code)}):\n${run.stderr}`).toBe(
        'SIGKILL',
      );
      if (process.env.CBT_CRASH_KEEP !== undefined) {
        fs.appendFileSync(`${dir}.log`, `${run.lines.map((l) => JSON.stringify(l)).join('\n')}\n-- kill\n`);
      }
      const { inFlight, armed } = model.applyRun(run.lines);
      operations += run.lines.filter((l) => l.t === 'intent').length;
      const where = plan.by === 'self' ? `${inFlight} (self)` : inFlight;
      inFlightAtKill.set(where, (inFlightAtKill.get(where) ?? 0) + 1);
      if (plan.by === 'self' && armed) selfKills++;

      const last = round === KILLS - 1;
      if (last || rand() >= UNVERIFIED_SHARE) {
        try {
          await verify(dir, model, round);
        } catch (err) {
          model.fail(`verification threw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
        }
        verified++;
      } else {
        checkCatalog(dir, model, 'right after the kill');
      }
      expect(
        model.failures,
        `${context}, killed in ${inFlight}; last lines:\n${tailOf(run.lines)}\n${run.stderr}`,
      ).toEqual([]);
    }
    const seconds = (Date.now() - started) / 1000;
    const inGroupOrDelete = [...inFlightAtKill]
      .filter(([k]) => SELF_KILL_OPS.some((op) => k === op || k === `${op} (self)`))
      .reduce((n, [, c]) => n + c, 0);
    console.log(
      `crash test: ${KILLS} kills (${verified} verified, ${selfKills} by the child itself, ${inGroupOrDelete} inside a ` +
        `group create/delete or snapshot delete), ${operations} operations, ${seconds.toFixed(1)} s, seed ${SEED}, ` +
        `in flight at kill: ${JSON.stringify(Object.fromEntries(inFlightAtKill))}`,
    );
    // A harness whose kills all land at the same point would test one thing many times.
    if (KILLS >= 10) expect([...inFlightAtKill.keys()].length).toBeGreaterThan(1);
    // Group snapshots and change records get their own share of kill points (20 or more under CI's 50 kills).
    expect(
      inGroupOrDelete,
      'kills inside CreateGroupSnapshot, DeleteGroupSnapshot or DeleteSnapshot',
    ).toBeGreaterThanOrEqual(Math.floor(KILLS * 0.4));
  }, 900_000);
});
