/**
 * Shared pieces of the example-based engine suites (validation, compaction, space, reads-writes):
 * temporary stores, deterministic data, extent collection, error assertions, and a small chain model
 * that derives the expected content, delta and allocated results from the operations a test performs.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterEach, expect } from 'vitest';
import { BlockStore } from '../../../storage-engine/index.js';
import type { EngineError, EngineErrorCode } from '../../../storage-engine/errors.js';
import type { ExtentStream } from '../../../storage-engine/extent-stream.js';
import type { Extent, ExtentStyle, StoreOptions } from '../../../storage-engine/types.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** Opened stores and their directories; each test's are closed and removed after it. */
export interface TempStores {
  /** A fresh store in a new temporary directory. */
  open(options?: StoreOptions): { store: BlockStore; dir: string };
  /** Opens `dir` again (after a close), tracked for cleanup like the first. */
  reopen(dir: string, options?: StoreOptions): BlockStore;
}

/** Registers an afterEach that closes every store opened through the returned handle and deletes its directory. */
export function useTempStores(): TempStores {
  const stores: BlockStore[] = [];
  const dirs: string[] = [];
  afterEach(async () => {
    for (const s of stores.splice(0)) {
      // A test may have closed it already, or left it broken on purpose; cleanup must still run.
      await s.close().catch(() => undefined);
    }
    for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  });
  return {
    open(options) {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-engine-'));
      dirs.push(dir);
      const store = BlockStore.open(dir, options);
      stores.push(store);
      return { store, dir };
    },
    reopen(dir, options) {
      const store = BlockStore.open(dir, options);
      stores.push(store);
      return store;
    },
  };
}

/** Deterministic non-trivial bytes (xorshift32); different seeds give different content. */
export function pattern(seed: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/** Drains an extent stream, checking the batch bound, and returns the extents in order. */
export async function collect(stream: ExtentStream, batchSize?: number): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const batch of stream) {
    if (batchSize !== undefined) expect(batch.length).toBeLessThanOrEqual(batchSize);
    out.push(...batch.map((e) => ({ offset: e.offset, length: e.length })));
  }
  return out;
}

/** The extents a sorted-or-not set of block indexes should be reported as, from `startingOffset` on. */
export function extentsOf(
  blocks: Iterable<number>,
  blockSize: number,
  style: ExtentStyle,
  startingOffset = 0,
): Extent[] {
  const first = Math.floor(startingOffset / blockSize);
  const sorted = [...new Set(blocks)].filter((b) => b >= first).sort((a, b) => a - b);
  if (style === 'FIXED') return sorted.map((b) => ({ offset: b * blockSize, length: blockSize }));
  const runs: Extent[] = [];
  for (const b of sorted) {
    const last = runs[runs.length - 1];
    if (last !== undefined && last.offset + last.length === b * blockSize) last.length += blockSize;
    else runs.push({ offset: b * blockSize, length: blockSize });
  }
  return runs;
}

/** Block indexes touched by the byte range [offset, offset + length). */
export function blocksOfRange(offset: number, length: number, blockSize: number): number[] {
  if (length === 0) return [];
  const out: number[] = [];
  for (let b = Math.floor(offset / blockSize); b <= Math.floor((offset + length - 1) / blockSize); b++) out.push(b);
  return out;
}

/** Runs `fn` (sync or async) and returns what it threw or rejected with, or undefined if it succeeded. */
export async function caught(fn: () => unknown): Promise<unknown> {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  return undefined;
}

type ErrorClass = abstract new (...args: never[]) => EngineError;

/** Asserts that `fn` fails (synchronously or by rejection) with an engine error of that class and code. */
export async function expectEngineError(fn: () => unknown, cls: ErrorClass, code: EngineErrorCode): Promise<void> {
  const err = await caught(fn);
  expect(err, `expected ${cls.name}`).toBeInstanceOf(cls);
  expect((err as EngineError).code).toBe(code);
}

/** Asserts that a synchronous call throws the engine error at once (not later, e.g. during iteration). */
export function expectThrowsNow(fn: () => unknown, cls: ErrorClass, code: EngineErrorCode): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, `expected ${cls.name} thrown synchronously`).toBeInstanceOf(cls);
  expect((err as EngineError).code).toBe(code);
}

/** Byte equality with a message naming the first differing offset instead of dumping megabytes. */
export function expectSameBytes(actual: Uint8Array, expected: Uint8Array, label: string): void {
  expect(actual.length, `${label}: length`).toBe(expected.length);
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  const e = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  if (a.equals(e)) return;
  let i = 0;
  while (i < a.length && a[i] === e[i]) i++;
  expect.fail(`${label}: first difference at byte ${i} (actual ${a[i]}, expected ${e[i]})`);
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Bytes really allocated on disk under `dir` (st_blocks × 512, summed over every file). */
export function diskUsage(dir: string): number {
  let total = 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) total += diskUsage(p);
    else if (entry.isFile()) total += fs.statSync(p).blocks * 512;
  }
  return total;
}

/** Names of the files in the store's layers/ directory (empty if it does not exist). */
export function layerFiles(dir: string): string[] {
  const d = path.join(dir, 'layers');
  return fs.existsSync(d) ? fs.readdirSync(d).sort() : [];
}

/** Yields to the event loop so that un-awaited engine work (e.g. compaction) can make progress. */
export function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

// ---------------------------------------------------------------------------------------------
// Chain model: what the design says a volume's reads, deltas and allocated sets must be.

/** What the last operation of one layer did to a block: a write (partial trims count) or a whole-block trim. */
export type BlockTouch = 'written' | 'trimmed';
/** The blocks one layer (frozen or head) touched. */
export type ModelLayer = Map<number, BlockTouch>;

/** The expected state of a snapshot: its bytes and its chain of layers (bottom first). */
export interface ModelSnap {
  readonly content: Buffer;
  readonly chain: readonly ModelLayer[];
  readonly capacityBytes: number;
  readonly blockSize: number;
}

/** The expected state of a live volume, fed the same operations as the engine. */
export class ModelVolume {
  content: Buffer;
  /** Frozen layers below the head, bottom first (shared by reference with snapshots and clones). */
  frozen: ModelLayer[];
  head: ModelLayer = new Map();

  constructor(
    readonly blockSize: number,
    capacityBytes: number,
    frozen: ModelLayer[] = [],
    content?: Buffer,
  ) {
    this.frozen = frozen;
    this.content = Buffer.alloc(capacityBytes);
    if (content) content.copy(this.content);
  }

  get capacityBytes(): number {
    return this.content.length;
  }

  write(offset: number, data: Uint8Array): void {
    this.content.set(data, offset);
    for (const b of blocksOfRange(offset, data.length, this.blockSize)) this.head.set(b, 'written');
  }

  trim(offset: number, length: number): void {
    this.content.fill(0, offset, offset + length);
    for (const b of blocksOfRange(offset, length, this.blockSize)) {
      const whole = b * this.blockSize >= offset && (b + 1) * this.blockSize <= offset + length;
      this.head.set(b, whole ? 'trimmed' : 'written');
    }
  }

  grow(capacityBytes: number): void {
    const next = Buffer.alloc(capacityBytes);
    this.content.copy(next);
    this.content = next;
  }

  snapshot(): ModelSnap {
    const snap: ModelSnap = {
      content: Buffer.from(this.content),
      chain: [...this.frozen, this.head],
      capacityBytes: this.capacityBytes,
      blockSize: this.blockSize,
    };
    this.frozen = [...this.frozen, this.head];
    this.head = new Map();
    return snap;
  }

  /** A clone of a snapshot shares its chain and starts with an empty head. */
  static cloneOf(snap: ModelSnap, capacityBytes = snap.capacityBytes): ModelVolume {
    return new ModelVolume(snap.blockSize, capacityBytes, [...snap.chain], snap.content);
  }

  /** A clone of a live volume freezes the volume's head into a layer both then share. */
  cloneVolume(capacityBytes = this.capacityBytes): ModelVolume {
    this.frozen = [...this.frozen, this.head];
    this.head = new Map();
    return new ModelVolume(this.blockSize, capacityBytes, [...this.frozen], this.content);
  }
}

/** Whether `base`'s chain is a prefix of `target`'s, i.e. delta(base, target) is defined. */
export function related(base: ModelSnap, target: ModelSnap): boolean {
  if (base.chain.length > target.chain.length) return false;
  return base.chain.every((layer, i) => target.chain[i] === layer);
}

/** Blocks written or trimmed after `base` up to and including `target`. */
export function modelDelta(base: ModelSnap, target: ModelSnap): number[] {
  if (!related(base, target)) throw new Error('model: unrelated snapshots');
  const out = new Set<number>();
  for (const layer of target.chain.slice(base.chain.length)) for (const b of layer.keys()) out.add(b);
  return [...out].sort((a, b) => a - b);
}

/** Blocks whose topmost entry in the snapshot's chain is a write. */
export function modelAllocated(snap: ModelSnap): number[] {
  const top = new Map<number, BlockTouch>();
  for (const layer of snap.chain) for (const [b, t] of layer) top.set(b, t);
  return [...top]
    .filter(([, t]) => t === 'written')
    .map(([b]) => b)
    .sort((a, b) => a - b);
}
