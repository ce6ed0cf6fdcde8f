/**
 * The answers file of `cbt-csi generate`: one JSON line per run, appended, saying exactly which blocks
 * the run changed, whether each ended written or trimmed, and the SHA-256 it reads as afterwards.
 * `cbt-csi check` replays the runs to know what a snapshot holds and what changed between two.
 */
import fs from 'node:fs';

/** One generate run. Offsets and lengths are bytes; runs of blocks are [offset, length] pairs, merged and ordered. */
export interface AnswerRun {
  version: 1;
  pattern: string;
  seed: number;
  count: number;
  blockSize: number;
  target: string;
  capacityBytes: number;
  /** Milliseconds since the epoch: before the first operation, and after the final sync. */
  startedAtMs: number;
  finishedAtMs: number;
  /** Every block the run changed. */
  changed: [number, number][];
  /** The part of `changed` whose last operation was a trim (reads as zeros; no longer allocated). */
  trimmed: [number, number][];
  /** SHA-256 (hex) of each block of `changed`, in order, as it reads after the run. */
  sha256: string[];
}

/** The final state of each block a run touched: its hash, and whether its last operation was a trim. */
export type BlockStates = Map<number, { sha256: string; trimmed: boolean }>;

/** Merged, ordered runs of the given block indexes, as [byte offset, byte length]. */
export function blockRuns(blocks: Iterable<number>, blockSize: number): [number, number][] {
  const sorted = [...blocks].sort((a, b) => a - b);
  const runs: [number, number][] = [];
  for (const b of sorted) {
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === b * blockSize) last[1] += blockSize;
    else runs.push([b * blockSize, blockSize]);
  }
  return runs;
}

/** Block indexes of byte runs. */
export function* runBlocks(runs: readonly [number, number][], blockSize: number): Generator<number> {
  for (const [offset, length] of runs)
    for (let at = offset; at < offset + length; at += blockSize) yield at / blockSize;
}

/** A run record from the states of the blocks it touched. */
export function answerRun(
  meta: Omit<AnswerRun, 'version' | 'changed' | 'trimmed' | 'sha256'>,
  states: BlockStates,
): AnswerRun {
  const blocks = [...states.keys()].sort((a, b) => a - b);
  return {
    version: 1,
    ...meta,
    changed: blockRuns(blocks, meta.blockSize),
    trimmed: blockRuns(
      blocks.filter((b) => states.get(b)!.trimmed),
      meta.blockSize,
    ),
    sha256: blocks.map((b) => states.get(b)!.sha256),
  };
}

export function appendAnswerRun(file: string, run: AnswerRun): void {
  fs.appendFileSync(file, `${JSON.stringify(run)}\n`, { mode: 0o600 });
}

/** Reads every run of an answers file; errors name the line. */
export function readAnswerRuns(file: string): AnswerRun[] {
  const runs: AnswerRun[] = [];
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  for (const [i, line] of lines.entries()) {
    if (line.trim() === '') continue;
    let run: AnswerRun;
    try {
      run = JSON.parse(line) as AnswerRun;
    } catch (err) {
      throw new Error(`${file}:${i + 1}: not JSON (${(err as Error).message})`);
    }
    if (
      run.version !== 1 ||
      !Array.isArray(run.changed) ||
      !Array.isArray(run.sha256) ||
      !Number.isSafeInteger(run.blockSize)
    ) {
      throw new Error(`${file}:${i + 1}: not an answers record of version 1`);
    }
    const blocks = run.changed.reduce((n, [, length]) => n + length / run.blockSize, 0);
    if (blocks !== run.sha256.length)
      throw new Error(`${file}:${i + 1}: ${blocks} changed blocks but ${run.sha256.length} hashes`);
    runs.push(run);
  }
  if (runs.length > 0 && runs.some((r) => r.blockSize !== runs[0]!.blockSize)) {
    throw new Error(`${file}: runs use different block sizes; check one block size per answers file`);
  }
  return runs;
}

/** Applies a run to block states (later runs win). */
export function applyRun(states: BlockStates, run: AnswerRun): void {
  const trimmed = new Set(runBlocks(run.trimmed, run.blockSize));
  let i = 0;
  for (const b of runBlocks(run.changed, run.blockSize))
    states.set(b, { sha256: run.sha256[i++]!, trimmed: trimmed.has(b) });
}
