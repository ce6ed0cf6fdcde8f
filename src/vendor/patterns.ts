/**
 * Seeded write patterns for `cbt-csi generate`: the same seed, pattern, count, block size and capacity
 * give the same operations and the same bytes on every run, so a vendor can reproduce a failure.
 */
import { createHash } from 'node:crypto';

export const PATTERNS = ['random', 'sequential', 'hotspot', 'sparse', 'trim'] as const;
export type PatternName = (typeof PATTERNS)[number];

/** One operation on whole blocks. Writes carry their bytes; trims read back as zeros afterwards. */
export type PatternOp =
  | { kind: 'write'; block: number; blocks: number; data: Buffer }
  | { kind: 'trim'; block: number; blocks: number };

export interface PatternSpec {
  pattern: PatternName;
  seed: number;
  /** Operations to make (sequential: blocks to write). */
  count: number;
  blockSize: number;
  capacityBytes: number;
}

/** The longest run one sequential write or trim covers, so one operation stays a few MiB at most. */
const MAX_RUN_BLOCKS = 256;
/** Longest trim. */
const MAX_TRIM_BLOCKS = 16;

/** A seeded 32-bit generator (mulberry32): small, fast, identical everywhere. */
export class SeededRandom {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** An integer in [0, n). */
  below(n: number): number {
    return Math.floor(this.next() * n);
  }
  fill(buf: Buffer): Buffer {
    for (let i = 0; i + 4 <= buf.length; i += 4) buf.writeUInt32LE(Math.floor(this.next() * 4294967296), i);
    return buf;
  }
}

/** The operations of a pattern, in the order they are applied. */
export function* patternOps(spec: PatternSpec): Generator<PatternOp> {
  const { blockSize, count } = spec;
  const total = Math.floor(spec.capacityBytes / blockSize);
  if (total < 1) throw new Error(`the target holds no whole ${blockSize}-byte block`);
  if (!Number.isSafeInteger(count) || count < 1) throw new Error('count must be a positive integer');
  const rnd = new SeededRandom(spec.seed);
  const block = (n: number) => rnd.fill(Buffer.allocUnsafe(n * blockSize));
  switch (spec.pattern) {
    case 'random':
      for (let i = 0; i < count; i++) yield { kind: 'write', block: rnd.below(total), blocks: 1, data: block(1) };
      return;
    case 'sequential': {
      const length = Math.min(count, total);
      const start = rnd.below(total - length + 1);
      for (let at = start; at < start + length; at += MAX_RUN_BLOCKS) {
        const n = Math.min(MAX_RUN_BLOCKS, start + length - at);
        yield { kind: 'write', block: at, blocks: n, data: block(n) };
      }
      return;
    }
    case 'hotspot': {
      // Nine writes in ten land in a hot sixteenth of the volume: many overwrites of the same blocks.
      const hot = Math.max(1, Math.floor(total / 16));
      const hotStart = rnd.below(total - hot + 1);
      for (let i = 0; i < count; i++) {
        const at = rnd.next() < 0.9 ? hotStart + rnd.below(hot) : rnd.below(total);
        yield { kind: 'write', block: at, blocks: 1, data: block(1) };
      }
      return;
    }
    case 'sparse': {
      // Evenly spread single blocks with a seeded jitter: every extent is its own tuple.
      const n = Math.min(count, total);
      const stride = Math.floor(total / n);
      for (let i = 0; i < n; i++)
        yield { kind: 'write', block: i * stride + rnd.below(stride), blocks: 1, data: block(1) };
      return;
    }
    case 'trim':
      for (let i = 0; i < count; i++) {
        const n = Math.min(total, 1 + rnd.below(MAX_TRIM_BLOCKS));
        yield { kind: 'trim', block: rnd.below(total - n + 1), blocks: n };
      }
      return;
  }
}

/** SHA-256 (hex) of each block of `data`. */
export function blockHashes(data: Buffer, blockSize: number): string[] {
  const out: string[] = [];
  for (let at = 0; at < data.length; at += blockSize)
    out.push(
      createHash('sha256')
        .update(data.subarray(at, at + blockSize))
        .digest('hex'),
    );
  return out;
}

const zeroHashes = new Map<number, string>();
/** SHA-256 (hex) of a block of zeros: what a trimmed block reads as. */
export function zeroBlockHash(blockSize: number): string {
  let hash = zeroHashes.get(blockSize);
  if (!hash) {
    hash = createHash('sha256').update(Buffer.alloc(blockSize)).digest('hex');
    zeroHashes.set(blockSize, hash);
  }
  return hash;
}
