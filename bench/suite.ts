/**
 * The contract between the benchmark runner (bench/run.ts) and a suite (bench/<suite>.ts), plus the small
 * statistics and randomness helpers every suite needs. A suite is any bench/<name>.ts that exports `run`.
 */

import fs from 'node:fs';

/** A parameter value recorded with a result; kept to JSON scalars so result lines stay flat and greppable. */
export type ParamValue = string | number | boolean;

/** One measured figure: exactly one JSON line on stdout. */
export interface BenchResult {
  suite: string;
  metric: string;
  value: number;
  unit: string;
  params: Record<string, ParamValue>;
  /** Human-readable goal, e.g. "< 50 ms"; present only when the figure has one. */
  target?: string;
  /** Whether `value` met `target`; present exactly when `target` is. */
  pass?: boolean;
}

/** What the runner hands a suite. */
export interface SuiteContext {
  /** A scratch directory owned by this suite run; the runner deletes it afterwards. */
  readonly dir: string;
  /** Tiny sizes: a smoke run that checks the plumbing and output format in seconds, not the figures. */
  readonly quick: boolean;
  /** Case names to run (from --only); undefined means all of them. */
  readonly only: ReadonlySet<string> | undefined;
  /** Prints one result line; the runner fills in `suite`. */
  emit(result: Omit<BenchResult, 'suite'>): void;
  /** Progress for humans: goes to stderr so stdout stays pure JSON lines. */
  log(message: string): void;
}

/** The one export a suite module must have. */
export type SuiteRun = (ctx: SuiteContext) => Promise<void>;

/** Median of a non-empty sample (mean of the middle two for even sizes). */
export function median(samples: readonly number[]): number {
  if (samples.length === 0) throw new RangeError('median of an empty sample');
  const sorted = [...samples].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** Nearest-rank percentile (p in (0, 100]); with 50 samples p99 is the maximum, which is what it should be. */
export function percentile(samples: readonly number[], p: number): number {
  if (samples.length === 0) throw new RangeError('percentile of an empty sample');
  const sorted = [...samples].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

/** Rounds for display in result lines; measurement noise makes more digits meaningless. */
export function round(value: number, digits = 3): number {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

/** Seeded PRNG so that a run's random positions can be reproduced from the seed in its params. */
import { mulberry32 as prng } from '../test/support/random.js';
export { prng };

/** Integer in [0, n) from a PRNG. */
export function randomBelow(rand: () => number, n: number): number {
  return Math.floor(rand() * n);
}

/** `count` distinct integers in [0, n), in ascending order. */
export function distinctSorted(rand: () => number, count: number, n: number): Uint32Array {
  if (count > n) throw new RangeError(`cannot pick ${count} distinct values below ${n}`);
  const picked = new Set<number>();
  while (picked.size < count) picked.add(randomBelow(rand, n));
  return Uint32Array.from(picked).sort();
}

/**
 * User and system CPU time, ms, of a process or thread so far: `/proc/<pid>/stat` or
 * `/proc/<pid>/task/<tid>/stat`. utime and stime are its 14th and 15th fields, in USER_HZ (100 on every Linux
 * this runs on); the fields are counted after the parenthesised command name, which may hold spaces.
 */
export function procCpuMs(statFile: string): { user: number; sys: number } {
  const stat = fs.readFileSync(statFile, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { user: Number(fields[11]) * 10, sys: Number(fields[12]) * 10 };
}

/** Milliseconds elapsed since `start` (a performance.now() reading). */
export function msSince(start: number): number {
  return performance.now() - start;
}

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** A result as a suite yields it; the runner adds the suite name. */
export type Result = Omit<BenchResult, 'suite'>;

/** A result with the target it is judged against. */
export function targeted(result: Result, target: string, pass: boolean): Result {
  return { ...result, target, pass };
}

/** "1TiB", "16MiB": capacities as people write them, for params and logs. */
export function sizeLabel(bytes: number): string {
  const units: Array<[number, string]> = [
    [TiB, 'TiB'],
    [GiB, 'GiB'],
    [MiB, 'MiB'],
    [KiB, 'KiB'],
  ];
  for (const [unit, name] of units) if (bytes >= unit && bytes % unit === 0) return `${bytes / unit}${name}`;
  return `${bytes}B`;
}

/** Seeded random bytes (a whole number of 32-bit words). */
export function randomBuffer(bytes: number, seed: number): Buffer {
  const rand = prng(seed);
  const buf = Buffer.allocUnsafe(bytes);
  for (let i = 0; i < bytes; i += 4) buf.writeUInt32LE((rand() * 4294967296) >>> 0, i);
  return buf;
}
