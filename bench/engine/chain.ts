/**
 * The `chain` case of the engine suite: what a long snapshot chain costs. A volume takes 1,000 snapshots
 * with 200 random 4 KiB writes between them; at checkpoints the case times random 4 KiB reads, 1 KiB partial
 * writes (read-modify-write from below the head), and a delta between the two newest snapshots. Every
 * snapshot is timed, in two kinds taken in turn: after a flush of the writes (as when an application freezes
 * its filesystem before the snapshot: the cut's own cost) and straight after unflushed writes (the cut plus
 * syncing 200 scattered blocks, which is the disk's cost). The flush is timed on its own.
 * Then a store with 10 volumes × 1,000 snapshots is reopened in a fresh process.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlockStore } from '../../storage-engine/index.js';
import {
  GiB,
  KiB,
  MiB,
  msSince,
  percentile,
  prng,
  randomBelow,
  randomBuffer,
  round,
  sizeLabel,
  targeted,
  type ParamValue,
  type SuiteContext,
} from '../suite.js';

const BLOCK = 4 * KiB;
const SEED = 20261130;

interface Checkpoint {
  snapshots: number;
  readUs: number;
  partialWriteUs: number;
  deltaMs: number;
}

/** Mean microseconds per call of `fn` over `n` calls. */
function meanUs(n: number, fn: (i: number) => void): number {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) fn(i);
  return (msSince(t0) * 1000) / n;
}

async function drainCount(stream: AsyncIterable<unknown[]>): Promise<number> {
  let n = 0;
  for await (const batch of stream) n += batch.length;
  return n;
}

/** Builds `snapshots` snapshots on one volume, timing each and measuring at the checkpoints. */
async function oneLongChain(ctx: SuiteContext, dir: string): Promise<void> {
  const capacityBytes = ctx.quick ? 64 * MiB : GiB;
  const total = ctx.quick ? 30 : 1000;
  const writesBetween = 200;
  const checkpoints = new Set(ctx.quick ? [1, 10, 30] : [1, 10, 100, 1000]);
  const reads = ctx.quick ? 2_000 : 20_000;
  const partials = ctx.quick ? 500 : 2_000;
  const blocks = capacityBytes / BLOCK;
  const data = randomBuffer(BLOCK, SEED);
  const small = data.subarray(0, KiB);
  const rand = prng(SEED + 1);
  const readBuf = { length: BLOCK };
  /** CreateSnapshot of a volume whose writes were flushed just before (odd-numbered snapshots). */
  const snapshotMs: number[] = [];
  /** CreateSnapshot straight after unflushed writes (even-numbered snapshots). */
  const unflushedSnapshotMs: number[] = [];
  const flushMs: number[] = [];
  const results: Checkpoint[] = [];
  fs.mkdirSync(dir, { recursive: true });
  const store = BlockStore.open(dir, { autoCompact: false });
  try {
    const vol = await store.createVolume({ name: 'chain', capacityBytes, blockSize: BLOCK });
    const snapIds: string[] = [];
    for (let s = 1; s <= total; s++) {
      for (let w = 0; w < writesBetween; w++) store.write(vol.id, randomBelow(rand, blocks) * BLOCK, data);
      const flushFirst = s % 2 === 1;
      if (flushFirst) {
        const tf = performance.now();
        await store.flush(vol.id);
        flushMs.push(msSince(tf));
      }
      const t0 = performance.now();
      const snap = await store.createSnapshot({ volumeId: vol.id, name: `chain-${s}` });
      (flushFirst ? snapshotMs : unflushedSnapshotMs).push(msSince(t0));
      snapIds.push(snap.id);
      if (!checkpoints.has(s)) {
        if (s % 100 === 0) ctx.log(`chain: ${s}/${total} snapshots`);
        continue;
      }
      const readUs = meanUs(reads, () => store.read(vol.id, randomBelow(rand, blocks) * BLOCK, readBuf.length));
      // Just after a snapshot the head holds nothing: each partial write copies its block up from below.
      const partialWriteUs = meanUs(partials, () =>
        store.write(vol.id, randomBelow(rand, blocks) * BLOCK + KiB, small),
      );
      let deltaMs = 0;
      if (snapIds.length >= 2) {
        const t1 = performance.now();
        await drainCount(store.delta(snapIds[snapIds.length - 2]!, snapIds[snapIds.length - 1]!));
        deltaMs = msSince(t1);
      }
      results.push({ snapshots: s, readUs, partialWriteUs, deltaMs });
      ctx.log(`chain: at ${s} snapshots read ${readUs.toFixed(1)} µs, partial write ${partialWriteUs.toFixed(1)} µs`);
    }
  } finally {
    await store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }

  const params: Record<string, ParamValue> = {
    capacity: sizeLabel(capacityBytes),
    blockSize: BLOCK,
    randomWritesBetweenSnapshots: writesBetween,
    readsPerCheckpoint: reads,
    partialWritesPerCheckpoint: partials,
    partialWriteBytes: KiB,
    quick: ctx.quick,
  };
  for (const c of results) {
    const at = { ...params, snapshots: c.snapshots };
    ctx.emit({ metric: 'chain_read_4k_us', value: round(c.readUs, 2), unit: 'µs', params: at });
    ctx.emit({ metric: 'chain_partial_write_1k_us', value: round(c.partialWriteUs, 2), unit: 'µs', params: at });
    if (c.deltaMs > 0)
      ctx.emit({ metric: 'chain_delta_newest_pair_ms', value: round(c.deltaMs), unit: 'ms', params: at });
  }
  const first = results[0]!;
  const last = results[results.length - 1]!;
  const ratioParams = { ...params, from: first.snapshots, to: last.snapshots };
  const readRatio = last.readUs / first.readUs;
  const writeRatio = last.partialWriteUs / first.partialWriteUs;
  ctx.emit(
    targeted(
      { metric: 'chain_read_cost_ratio', value: round(readRatio, 2), unit: 'x', params: ratioParams },
      '<= 2',
      readRatio <= 2,
    ),
  );
  ctx.emit(
    targeted(
      { metric: 'chain_partial_write_cost_ratio', value: round(writeRatio, 2), unit: 'x', params: ratioParams },
      '<= 2',
      writeRatio <= 2,
    ),
  );
  const snapParams = {
    ...params,
    snapshots: total,
    timing: 'CreateSnapshot in-process, the writes before it flushed first (flush untimed here), odd snapshots',
  };
  const p99 = percentile(snapshotMs, 99);
  ctx.emit(
    targeted(
      { metric: 'chain_snapshot_p99_ms', value: round(p99), unit: 'ms', params: snapParams },
      '< 10 ms',
      p99 < 10,
    ),
  );
  emitTrend(ctx, 'chain_snapshot', snapshotMs, snapParams);
  const unflushedParams = {
    ...params,
    snapshots: total,
    timing: 'CreateSnapshot in-process straight after 200 unflushed writes (includes syncing them), even snapshots',
  };
  ctx.emit({
    metric: 'chain_snapshot_unflushed_p99_ms',
    value: round(percentile(unflushedSnapshotMs, 99)),
    unit: 'ms',
    params: unflushedParams,
  });
  emitTrend(ctx, 'chain_snapshot_unflushed', unflushedSnapshotMs, unflushedParams);
  const flushParams = { ...params, snapshots: total, timing: 'flush of 200 random 4 KiB writes, odd snapshots' };
  ctx.emit({ metric: 'chain_flush_p99_ms', value: round(percentile(flushMs, 99)), unit: 'ms', params: flushParams });
  emitTrend(ctx, 'chain_flush', flushMs, flushParams);
}

/** p50 and p99 of the first and last tenth of a series: whether its cost stays flat as the chain grows. */
function emitTrend(ctx: SuiteContext, prefix: string, series: readonly number[], params: Record<string, ParamValue>) {
  const bucket = Math.max(1, Math.floor(series.length / 10));
  const parts = { first_tenth: series.slice(0, bucket), last_tenth: series.slice(-bucket) };
  for (const [part, values] of Object.entries(parts)) {
    for (const p of [50, 99]) {
      ctx.emit({ metric: `${prefix}_p${p}_${part}_ms`, value: round(percentile(values, p)), unit: 'ms', params });
    }
  }
}

interface ReopenReport {
  openMs: number;
  rssMB: number;
  layers: number;
}

/** Fills a store with many volumes × snapshots, then times opening it in a fresh process. */
async function reopenMany(ctx: SuiteContext, dir: string): Promise<void> {
  const volumes = ctx.quick ? 2 : 10;
  const snapshots = ctx.quick ? 30 : 1000;
  const writesBetween = 20;
  const capacityBytes = GiB;
  const data = randomBuffer(BLOCK, SEED + 2);
  const rand = prng(SEED + 3);
  fs.mkdirSync(dir, { recursive: true });
  try {
    const t0 = performance.now();
    const store = BlockStore.open(dir, { autoCompact: false });
    try {
      for (let v = 0; v < volumes; v++) {
        const vol = await store.createVolume({ name: `reopen-${v}`, capacityBytes, blockSize: BLOCK });
        for (let s = 0; s < snapshots; s++) {
          for (let w = 0; w < writesBetween; w++)
            store.write(vol.id, randomBelow(rand, capacityBytes / BLOCK) * BLOCK, data);
          await store.createSnapshot({ volumeId: vol.id, name: `reopen-${v}-${s}` });
        }
        ctx.log(`chain: reopen store, volume ${v + 1}/${volumes} has ${snapshots} snapshots`);
      }
    } finally {
      await store.close();
    }
    const buildSeconds = msSince(t0) / 1000;
    const report = await openInChild(dir);
    const params: Record<string, ParamValue> = {
      volumes,
      snapshotsPerVolume: snapshots,
      randomWritesBetweenSnapshots: writesBetween,
      capacity: sizeLabel(capacityBytes),
      layers: report.layers,
      buildSeconds: round(buildSeconds, 1),
      process: 'fresh child: BlockStore.open until it returns, RSS after',
      MB: '2^20 bytes',
      quick: ctx.quick,
    };
    ctx.emit(
      targeted(
        { metric: 'chain_reopen_ms', value: round(report.openMs, 1), unit: 'ms', params },
        '< 2000 ms',
        report.openMs < 2000,
      ),
    );
    ctx.emit(
      targeted(
        { metric: 'chain_reopen_rss_mb', value: round(report.rssMB, 1), unit: 'MB', params },
        '< 500 MB',
        report.rssMB < 500,
      ),
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function openInChild(dir: string): Promise<ReopenReport> {
  const child = path.join(path.dirname(fileURLToPath(import.meta.url)), 'open-store-child.ts');
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--import', 'tsx', child], {
      stdio: ['ignore', 'pipe', 'inherit'],
      // Arguments travel in the environment: the native bitmap module parses argv when it loads.
      env: { ...process.env, CBT_BENCH_STORE_DIR: dir },
    });
    let out = '';
    p.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    p.on('error', reject);
    p.on('close', (code) => {
      if (code !== 0) return reject(new Error(`open-store child exited with ${code}`));
      try {
        resolve(JSON.parse(out.trim()) as ReopenReport);
      } catch (err) {
        reject(new Error(`open-store child printed no report: ${String(err)}`));
      }
    });
  });
}

export async function chain(ctx: SuiteContext): Promise<void> {
  await oneLongChain(ctx, path.join(ctx.dir, 'chain'));
  await reopenMany(ctx, path.join(ctx.dir, 'chain-reopen'));
}
