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
 * CBT_CRASH_KILLS sets the number of kills (default 50 when CI=true, else 20); CBT_CRASH_SEED replays a
 * run's operation streams (kill timing stays wall-clock).
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
import type { Extent } from '../../storage-engine/types.js';
import { extentShapeViolation } from './support/block-model.js';
import {
  BLOCK_SIZE,
  decodeBlock,
  prng,
  type ChildConfig,
  type ChildLine,
  type CrashOp,
  type ListedSnapshot,
} from './support/crash-child.js';

const KILLS = Number(process.env.CBT_CRASH_KILLS ?? (process.env.CI === 'true' ? 50 : 20));
const SEED = Number(process.env.CBT_CRASH_SEED ?? Math.floor(Math.random() * 2 ** 31));
const VOLUME_BLOCKS = [1024, 256];
const MAX_SNAPSHOTS_PER_VOLUME = 5;
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
    this.touches.push({ seq, first, count });
  }

  markDurable(): void {
    this.dur = this.cur.slice();
    this.pending = Array.from({ length: this.blocks }, () => []);
  }

  /** After a kill, each block holds its durable value or any value announced since. */
  crash(): void {
    this.cur = this.cur.map((_, b) => [...new Set([...(this.dur[b] ?? []), ...(this.pending[b] ?? [])])]);
    this.markDurable();
  }

  /** The store showed these values (or a snapshot pins them): they are now the exact state. */
  pin(values: readonly Candidates[]): void {
    this.cur = values.slice();
    this.markDurable();
  }

  touchedBetween(afterSeq: number, uptoSeq: number): Set<number> {
    const blocks = new Set<number>();
    for (const t of this.touches) {
      if (t.seq > afterSeq && t.seq < uptoSeq) for (let b = t.first; b < t.first + t.count; b++) blocks.add(b);
    }
    return blocks;
  }
}

interface SnapshotModel {
  name: string;
  id: string | undefined;
  vol: number;
  /** Sequence number of its creating intent, on the same clock as the volume's touches. */
  seq: number;
  /** What each block must read (one candidate once a read pinned it). */
  content: Candidates[];
  /** alive: must exist; maybe: create or delete was in flight at a kill; deleted: must not exist. */
  status: 'alive' | 'maybe' | 'deleted';
  /** Its creation was in flight at a kill: if it exists, the volume was flushed up to it. */
  createInFlight: boolean;
}

class StoreModel {
  seq = 0;
  readonly volumes: VolumeModel[] = [];
  /** By name, in creation (intent) order. */
  readonly snapshots = new Map<string, SnapshotModel>();
  readonly failures: string[] = [];

  fail(message: string): void {
    if (this.failures.length < 40) this.failures.push(message);
  }

  volume(index: number): VolumeModel {
    const vm = this.volumes[index];
    if (vm === undefined) throw new Error(`child named unknown volume index ${index}`);
    return vm;
  }

  /** Checks a listing of the store against the model and learns which in-flight operations happened. */
  observeListing(volumeIds: readonly string[], listed: readonly ListedSnapshot[], when: string): void {
    const expectedIds = this.volumes.map((v) => v.id);
    if (JSON.stringify(volumeIds) !== JSON.stringify(expectedIds)) {
      this.fail(`${when}: volumes ${JSON.stringify(volumeIds)}, expected ${JSON.stringify(expectedIds)}`);
    }
    const seen = new Set<string>();
    for (const s of listed) {
      const m = s.name === undefined ? undefined : this.snapshots.get(s.name);
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
    for (const m of this.snapshots.values()) {
      if (seen.has(m.name)) continue;
      if (m.status === 'alive') this.fail(`${when}: acknowledged snapshot ${m.name} (${String(m.id)}) is missing`);
      if (m.status === 'maybe') m.status = 'deleted';
      m.createInFlight = false;
    }
  }

  /** Replays one child's announcements; the child was killed after the last of them. */
  applyRun(lines: readonly ChildLine[]): { inFlight: CrashOp['op'] | 'open' | 'between ops' } {
    let open: { seq: number; op: CrashOp; global: number } | undefined;
    let sawOpen = false;
    let sawReady = false;
    for (const line of lines) {
      switch (line.t) {
        case 'open':
          sawOpen = true;
          break;
        case 'ready':
          sawReady = true;
          this.observeListing(line.volumes, line.snapshots, 'child listing after reopen');
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
          this.applyAck(open.op, line.snapshotId);
          open = undefined;
          break;
        }
      }
    }
    for (const vm of this.volumes) vm.crash();
    // 'between ops' is mostly background compaction, which runs while the child yields between operations.
    return { inFlight: open?.op.op ?? (sawOpen && !sawReady ? 'open' : 'between ops') };
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
        if (this.snapshots.has(op.name)) throw new Error(`snapshot name ${op.name} reused`);
        this.snapshots.set(op.name, {
          name: op.name,
          id: undefined,
          vol: op.vol,
          seq,
          content: this.volume(op.vol).cur.slice(),
          status: 'maybe',
          createInFlight: true,
        });
        break;
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
      case 'flush':
      case 'compact':
        break;
    }
  }

  private applyAck(op: CrashOp, snapshotId: string | undefined): void {
    switch (op.op) {
      case 'flush':
        this.volume(op.vol).markDurable();
        break;
      case 'snapshot': {
        const m = this.snapshots.get(op.name);
        if (m === undefined || snapshotId === undefined) throw new Error(`snapshot ack without id for ${op.name}`);
        m.status = 'alive';
        m.createInFlight = false;
        m.id = snapshotId;
        this.volume(op.vol).markDurable();
        break;
      }
      case 'delete': {
        const m = this.snapshots.get(op.name);
        if (m !== undefined) m.status = 'deleted';
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
 * Layer file names the catalog references. Reads a private copy of the database (and its WAL, which the
 * copy replays) so the store directory is left exactly as the kill left it.
 */
function referencedLayerFiles(dir: string): Set<string> {
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-crash-catalog-'));
  try {
    for (const f of ['catalog.db', 'catalog.db-wal']) {
      if (fs.existsSync(path.join(dir, f))) fs.copyFileSync(path.join(dir, f), path.join(scratch, f));
    }
    const db = new Database(path.join(scratch, 'catalog.db'));
    try {
      const rows = db.prepare('SELECT id FROM layers').all() as { id: number }[];
      return new Set(rows.map((r) => `${r.id}.layer`));
    } finally {
      db.close();
    }
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
}

/** Invariant 5, any time: every layer the catalog names has its file. */
function checkReferencedFilesExist(dir: string, model: StoreModel, when: string): void {
  const present = new Set(fs.readdirSync(path.join(dir, 'layers')));
  for (const f of referencedLayerFiles(dir)) {
    if (!present.has(f)) model.fail(`${when}: the catalog references layers/${f}, which does not exist`);
  }
}

/** Invariant 5 after a clean open and close: the files are exactly the catalog's, and nothing else. */
function checkNoOrphans(dir: string, model: StoreModel): void {
  for (const entry of fs.readdirSync(dir)) {
    if (entry !== 'layers' && !CATALOG_FILES.includes(entry))
      model.fail(`unexpected entry ${entry} in the store directory`);
  }
  const referenced = referencedLayerFiles(dir);
  for (const f of fs.readdirSync(path.join(dir, 'layers'))) {
    if (!referenced.has(f)) model.fail(`orphan file layers/${f} survived open and close`);
  }
  checkReferencedFilesExist(dir, model, 'after close');
}

/** Invariant 2 for allocated() and invariant 1 for delta(), on every surviving snapshot of a volume. */
async function checkExtentQueries(store: BlockStore, model: StoreModel, vm: VolumeModel): Promise<void> {
  const listed = store.listSnapshots({ sourceVolumeId: vm.id }).map((s) => model.snapshots.get(s.name ?? ''));
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
  for (const [a, b] of pairs) {
    const what = `delta(${a.name}, ${b.name}) of volume ${vm.index}`;
    const delta = await extentBlocks(store.delta(a.id ?? '', b.id ?? ''), capacity, what, model);
    for (let blk = 0; blk < vm.blocks; blk++) {
      if (a.content[blk]?.[0] !== b.content[blk]?.[0] && !delta.has(blk)) {
        const change = `${describeCandidates(a.content[blk])} to ${describeCandidates(b.content[blk])}`;
        model.fail(`${what} misses block ${blk}, which changed from ${change}`);
        break;
      }
    }
    const touched = vm.touchedBetween(a.seq, b.seq);
    const extra = [...delta].filter((blk) => !touched.has(blk));
    if (extra.length > 0) {
      model.fail(`${what} reports blocks ${extra.slice(0, 8).join(',')} that no write or trim touched in between`);
    }
  }
}

/** Reopens the crashed store in this process and checks everything the model knows. */
async function verify(dir: string, model: StoreModel, round: number): Promise<void> {
  checkReferencedFilesExist(dir, model, 'right after the kill');
  // Opening a store whose catalog lost a file would only throw; the failure above says more.
  if (model.failures.length > 0) return;
  const store = BlockStore.open(dir);
  try {
    model.observeListing(
      store.listVolumes().map((v) => v.id),
      store.listSnapshots(),
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
        seq,
        content,
        status: 'alive',
        createInFlight: false,
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

/** Starts a child on the store and SIGKILLs it `delayMs` after it announces `trigger`. */
function runChild(dir: string, config: ChildConfig, trigger: 'open' | 'ready', delayMs: number): Promise<ChildRun> {
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
        setTimeout(kill, delayMs);
      }
      scanned = stdout.length;
    });
    child.stderr.on('data', (chunk: string) => {
      stderr += chunk;
    });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(watchdog);
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
  it(`keeps flushed writes, acknowledged snapshots, complete deltas and exactly its own files across ${KILLS} kills at random moments`, async () => {
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
    for (let round = 0; round < KILLS; round++) {
      const atOpen = rand() < KILL_AT_OPEN_SHARE;
      const delayMs = atOpen ? Math.floor(rand() * 20) : 30 + Math.floor(rand() * 571);
      const config: ChildConfig = {
        seed: Math.floor(rand() * 2 ** 31),
        firstWriteId: round * 1_000_000 + 1,
        snapshotPrefix: `${round}-`,
        maxSnapshotsPerVolume: MAX_SNAPSHOTS_PER_VOLUME,
      };
      const run = await runChild(dir, config, atOpen ? 'open' : 'ready', delayMs);
      const context =
        `seed ${SEED} (CBT_CRASH_SEED), round ${round}, child seed ${config.seed}, store ${dir} (CBT_CRASH_KEEP=1 keeps it), ` +
        `killed ${String(run.killedAfterMs)} ms after ${atOpen ? 'open' : 'ready'}`;
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
      const { inFlight } = model.applyRun(run.lines);
      operations += run.lines.filter((l) => l.t === 'intent').length;
      inFlightAtKill.set(inFlight, (inFlightAtKill.get(inFlight) ?? 0) + 1);

      const last = round === KILLS - 1;
      if (last || rand() >= UNVERIFIED_SHARE) {
        try {
          await verify(dir, model, round);
        } catch (err) {
          model.fail(`verification threw: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
        }
        verified++;
      } else {
        checkReferencedFilesExist(dir, model, 'right after the kill');
      }
      expect(
        model.failures,
        `${context}, killed in ${inFlight}; last lines:\n${tailOf(run.lines)}\n${run.stderr}`,
      ).toEqual([]);
    }
    const seconds = (Date.now() - started) / 1000;
    console.log(
      `crash test: ${KILLS} kills (${verified} verified), ${operations} operations, ${seconds.toFixed(1)} s, seed ${SEED}, ` +
        `in flight at kill: ${JSON.stringify(Object.fromEntries(inFlightAtKill))}`,
    );
    // A harness whose kills all land at the same point would test one thing many times.
    if (KILLS >= 10) expect([...inFlightAtKill.keys()].length).toBeGreaterThan(1);
  }, 600_000);
});
