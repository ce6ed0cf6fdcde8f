/**
 * `cbt-csi check`: compares what the driver reports for a snapshot (allocated) or a pair (delta) with the
 * known answers, and optionally a restored copy's bytes with the recorded hashes. Runs are placed in time
 * against the snapshots' creation times: a run belongs to a snapshot if it finished (synced) before the cut.
 */
import { createHash } from 'node:crypto';
import { applyRun, blockRuns, runBlocks, type AnswerRun, type BlockStates } from './answers.js';
import type { ReportedExtent } from './csi-metadata-reader.js';

/** Tuples are compared in 4 KiB units: the smallest block any driver profile here reports. */
const UNIT = 4096;

export interface CheckInput {
  runs: readonly AnswerRun[];
  snapshotCreatedAtMs: number;
  /** Set for a delta check. */
  baseCreatedAtMs?: number;
  /** The driver's extents; undefined skips the metadata comparison (restored data only). */
  reported?: readonly ReportedExtent[];
  /** How often the client resumed a cut stream while reading `reported` (shown in the report). */
  resumes?: number;
  /**
   * Bytes within which the driver may report more than changed (one granule holding a real change may be
   * reported whole): the profile's (ceph-rbd: its object size; hostpath and exact: the block size).
   */
  granularity: number;
  /** Reads the restored copy; undefined skips the data comparison. */
  readRestored?: (offset: number, length: number) => Promise<Buffer>;
}

export interface CheckReport {
  ok: boolean;
  mode: 'allocated' | 'delta';
  /** Runs (by line order, from 0) the expectation is built from. */
  runsUsed: number[];
  expectedBytes: number;
  reportedBytes: number | undefined;
  /** Times the client resumed a cut metadata stream (0 when none was cut or no driver was asked). */
  resumes: number;
  /** Byte runs the answers say must be reported and the driver did not. */
  missing: [number, number][];
  /** Byte runs reported beyond the answers, within a granule holding a real change (allowed). */
  extraAllowed: [number, number][];
  /** Byte runs reported beyond the answers and not explained by the granularity (a failure). */
  extraNotAllowed: [number, number][];
  /** Byte offsets of the restored copy's blocks whose SHA-256 differs from the answers. */
  checksumMismatches: number[];
  /** The answers' block size: the unit of checksumMismatches and blocksCompared. */
  blockSize: number;
  blocksCompared: number;
  /** Anything else that makes the answers unusable for this check. */
  problems: string[];
}

export async function checkAnswers(input: CheckInput): Promise<CheckReport> {
  const problems: string[] = [];
  const runs = input.runs;
  const blockSize = runs[0]?.blockSize ?? UNIT;
  if (blockSize % UNIT !== 0) problems.push(`the answers' block size ${blockSize} is not a multiple of ${UNIT}`);
  const S = input.snapshotCreatedAtMs;
  const B = input.baseCreatedAtMs;
  if (B !== undefined && B > S) problems.push('the base snapshot was cut after the target');
  for (const [i, run] of runs.entries()) {
    for (const [name, cut] of [
      ['snapshot', S],
      ['base snapshot', B],
    ] as const) {
      if (cut !== undefined && run.startedAtMs < cut && run.finishedAtMs > cut) {
        problems.push(
          `run ${i} (${run.pattern}, seed ${run.seed}) was still running when the ${name} was cut: snapshot after generate returns`,
        );
      }
    }
  }
  const upToS = runs.map((run, i) => ({ run, i })).filter(({ run }) => run.finishedAtMs <= S);
  // What the snapshot holds: every run before it, replayed in order.
  const final: BlockStates = new Map();
  for (const { run } of upToS) applyRun(final, run);
  let expectedBlocks: number[];
  let runsUsed: number[];
  if (B === undefined) {
    runsUsed = upToS.map(({ i }) => i);
    expectedBlocks = [...final].filter(([, s]) => !s.trimmed).map(([b]) => b);
  } else {
    const between = upToS.filter(({ run }) => run.startedAtMs >= B);
    runsUsed = between.map(({ i }) => i);
    expectedBlocks = [...new Set(between.flatMap(({ run }) => [...runBlocks(run.changed, blockSize)]))];
  }
  const perBlock = blockSize / UNIT;
  const expectedUnits = new Set<number>();
  for (const b of expectedBlocks) for (let u = 0; u < perBlock; u++) expectedUnits.add(b * perBlock + u);

  const missing: number[] = [];
  const extraAllowed: number[] = [];
  const extraNotAllowed: number[] = [];
  let reportedBytes: number | undefined;
  if (input.reported) {
    const reportedUnits = new Set<number>();
    let previousEnd = -1;
    reportedBytes = 0;
    for (const e of input.reported) {
      if (e.offset % UNIT !== 0 || e.length % UNIT !== 0 || e.length <= 0) {
        problems.push(`the driver reported [${e.offset}, +${e.length}), not whole ${UNIT}-byte units`);
        continue;
      }
      if (e.offset < previousEnd) problems.push(`the driver's tuples are out of order or overlap at byte ${e.offset}`);
      previousEnd = e.offset + e.length;
      reportedBytes += e.length;
      for (let at = e.offset; at < e.offset + e.length; at += UNIT) reportedUnits.add(at / UNIT);
    }
    for (const u of expectedUnits) if (!reportedUnits.has(u)) missing.push(u);
    const granuleUnits = Math.max(1, Math.max(input.granularity, blockSize) / UNIT);
    const changedGranules = new Set([...expectedUnits].map((u) => Math.floor(u / granuleUnits)));
    for (const u of reportedUnits) {
      if (expectedUnits.has(u)) continue;
      (changedGranules.has(Math.floor(u / granuleUnits)) ? extraAllowed : extraNotAllowed).push(u);
    }
  }

  const checksumMismatches: number[] = [];
  let blocksCompared = 0;
  if (input.readRestored) {
    for (const [b, state] of [...final].sort((x, y) => x[0] - y[0])) {
      const data = await input.readRestored(b * blockSize, blockSize);
      blocksCompared++;
      if (createHash('sha256').update(data).digest('hex') !== state.sha256) checksumMismatches.push(b * blockSize);
    }
  }

  const units = (list: number[]) => blockRuns(list, UNIT);
  const report: CheckReport = {
    ok: false,
    mode: B === undefined ? 'allocated' : 'delta',
    runsUsed,
    expectedBytes: expectedUnits.size * UNIT,
    reportedBytes,
    resumes: input.resumes ?? 0,
    missing: units(missing),
    extraAllowed: units(extraAllowed),
    extraNotAllowed: units(extraNotAllowed),
    checksumMismatches,
    blockSize,
    blocksCompared,
    problems,
  };
  report.ok =
    problems.length === 0 && missing.length === 0 && extraNotAllowed.length === 0 && checksumMismatches.length === 0;
  return report;
}

/** A few lines a person reads; the full report is available as JSON. */
export function formatReport(report: CheckReport): string {
  const runs = (list: [number, number][]) =>
    list
      .slice(0, 10)
      .map(([o, l]) => `[${o}, +${l})`)
      .join(' ') + (list.length > 10 ? ` … (${list.length} runs)` : '');
  const lines = [
    `${report.mode}: ${report.runsUsed.length} generate run(s) used; expected ${report.expectedBytes} bytes` +
      (report.reportedBytes === undefined ? '' : `, the driver reported ${report.reportedBytes}`) +
      (report.resumes > 0 ? ` (the client resumed ${report.resumes} cut stream(s))` : ''),
  ];
  if (report.reportedBytes !== undefined) {
    lines.push(`missing: ${report.missing.length === 0 ? 'none' : runs(report.missing)}`);
    lines.push(`extra, not allowed: ${report.extraNotAllowed.length === 0 ? 'none' : runs(report.extraNotAllowed)}`);
    lines.push(
      `extra, allowed by the profile's granularity: ${report.extraAllowed.length === 0 ? 'none' : runs(report.extraAllowed)}`,
    );
  }
  if (report.blocksCompared > 0 || report.checksumMismatches.length > 0) {
    lines.push(
      `restored data: ${report.blocksCompared} blocks compared, ${report.checksumMismatches.length} checksum mismatches`,
    );
    // Each bad block by its byte offset and block number, as a vendor looks it up in its own restore.
    for (const offset of report.checksumMismatches.slice(0, 10)) {
      lines.push(
        `checksum mismatch: block ${offset / report.blockSize} (bytes [${offset}, +${report.blockSize})) differs from the answers`,
      );
    }
    if (report.checksumMismatches.length > 10)
      lines.push(`… and ${report.checksumMismatches.length - 10} more blocks (--json lists all)`);
  }
  for (const p of report.problems) lines.push(`problem: ${p}`);
  lines.push(report.ok ? 'OK' : 'FAILED');
  return `${lines.join('\n')}\n`;
}
