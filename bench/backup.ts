/**
 * Backup suite: the backup toolkit against a driver child process (`cbt-csi serve`, all roles), through the
 * published block devices a backup reads. Needs root (the Node service); `--quick` shrinks every size.
 *
 * Cases (select with --only):
 *   full         a full backup of a fully written 1 GiB volume vs a plain sequential read of the same
 *                published device (target: backup ≥ 70% of the read's throughput)
 *   incremental  an incremental of 10,000 scattered 4 KiB changes on a 16 GiB volume vs reading just those
 *                blocks from the same device (target: ≤ 2× the read's time)
 *   client       the client iterating a 1,000,000-extent FIXED listing over CSI direct (target ≥ 1 M/s)
 *
 * Each timed read starts cold: the device's page cache is dropped (blockdev --flushbufs) before it.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { connectCsiDirect } from '../src/client/index.js';
import { openSource } from '../src/backup/block-target.js';
import { planBackup, writeBackup } from '../src/backup/backup-run.js';
import { BLOCK_CAPABILITY, CsiVolumes, type ExposedSnapshot } from '../src/backup/csi-volumes.js';
import { createProgress } from '../src/backup/progress.js';
import { BackupRepository } from '../src/backup/repository.js';
import { spawnDriver } from '../test/support/test-driver.js';
import {
  GiB,
  KiB,
  MiB,
  distinctSorted,
  msSince,
  prng,
  randomBuffer,
  round,
  sizeLabel,
  targeted,
  type SuiteContext,
} from './suite.js';

const SEED = 20261130;
const BLOCK = 4 * KiB;

interface Sizes {
  fullBytes: number;
  incrementalCapacity: number;
  changes: number;
  clientExtents: number;
}

const FULL: Sizes = { fullBytes: GiB, incrementalCapacity: 16 * GiB, changes: 10_000, clientExtents: 1_000_000 };
const QUICK: Sizes = { fullBytes: 64 * MiB, incrementalCapacity: GiB, changes: 500, clientExtents: 16_384 };

const quiet = createProgress('quiet');

function flushbufs(device: string): void {
  const r = spawnSync('blockdev', ['--flushbufs', device], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`blockdev --flushbufs ${device}: ${r.stderr}`);
}

/** Reads the given ranges with the same positioned reads a backup makes, 8 in flight; returns ms. */
async function timedRead(device: string, ranges: { offset: number; length: number }[]): Promise<number> {
  flushbufs(device);
  const handle = await fs.promises.open(device, 'r');
  const started = performance.now();
  try {
    let next = 0;
    const worker = async () => {
      const buf = Buffer.allocUnsafe(MiB);
      while (next < ranges.length) {
        const r = ranges[next++]!;
        await handle.read(buf, 0, r.length, r.offset);
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
  } finally {
    await handle.close();
  }
  return msSince(started);
}

class Driver {
  private constructor(
    readonly child: ChildProcess,
    readonly endpoint: string,
    readonly volumes: CsiVolumes,
  ) {}
  static async start(dir: string): Promise<Driver> {
    const endpoint = `unix://${path.join(dir, 'csi.sock')}`;
    const { child } = await spawnDriver([
      '--endpoint',
      endpoint,
      '--state-dir',
      path.join(dir, 'state'),
      '--log-level',
      'warn',
    ]);
    return new Driver(child, endpoint, new CsiVolumes(endpoint));
  }
  async volume(name: string, capacity: number, parameters: Record<string, string> = {}): Promise<string> {
    const res = await this.volumes.controller.createVolume({
      name,
      capacityRange: { requiredBytes: BigInt(capacity) },
      volumeCapabilities: [BLOCK_CAPABILITY],
      parameters,
    });
    return res.volume!.volumeId;
  }
  async snapshot(volumeId: string, name: string): Promise<string> {
    return (await this.volumes.controller.createSnapshot({ sourceVolumeId: volumeId, name })).snapshot!.snapshotId;
  }
  async stop(): Promise<void> {
    this.volumes.close();
    if (this.child.exitCode !== null) return;
    const exited = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGTERM');
    await exited;
  }
}

/** Writes `bytes` of seeded data sequentially through a device, then fsyncs. */
function fill(device: string, bytes: number): void {
  const fd = fs.openSync(device, 'r+');
  const chunk = randomBuffer(4 * MiB, SEED);
  for (let o = 0; o < bytes; o += chunk.length) {
    // No two 4 KiB blocks alike: no deduplication to flatter the backup.
    for (let b = 0; b < chunk.length; b += BLOCK) chunk.writeUInt32LE((o + b) / BLOCK, b);
    fs.writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - o), o);
  }
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

async function backupOnce(
  d: Driver,
  repo: BackupRepository,
  snapshot: string,
  base: string | null,
  exposed: ExposedSnapshot,
) {
  const client = connectCsiDirect(d.endpoint);
  try {
    const facts = await d.volumes.snapshot(snapshot);
    const plan = await planBackup(client, snapshot, facts.sourceVolume, base ? await repo.manifest(base) : null);
    const source = await openSource(exposed.device, plan.capacityBytes);
    const lock = await repo.lock();
    try {
      return { plan, summary: await writeBackup(repo, lock, plan, source, quiet) };
    } finally {
      await lock.release();
      await source.close();
    }
  } finally {
    await client.close();
  }
}

async function fullCase(ctx: SuiteContext, d: Driver, sizes: Sizes): Promise<void> {
  const volumeId = await d.volume('bench-full', sizes.fullBytes);
  const p = await d.volumes.publish(volumeId);
  fill(p.device, sizes.fullBytes);
  await p.release();
  const snap = await d.snapshot(volumeId, 'bench-full-1');
  const exposed = await d.volumes.expose(await d.volumes.snapshot(snap));
  try {
    const readMs = await timedRead(
      exposed.device,
      Array.from({ length: sizes.fullBytes / MiB }, (_, i) => ({ offset: i * MiB, length: MiB })),
    );
    const repo = await BackupRepository.openOrCreate(path.join(ctx.dir, 'repo-full'));
    flushbufs(exposed.device);
    const started = performance.now();
    const { summary } = await backupOnce(d, repo, snap, null, exposed);
    const backupMs = msSince(started);
    const params = {
      volume: sizeLabel(sizes.fullBytes),
      written: 'all',
      chunk: '1MiB',
      quick: ctx.quick,
      storedBytes: summary.newBytes,
    };
    const readRate = sizes.fullBytes / MiB / (readMs / 1000);
    const backupRate = sizes.fullBytes / MiB / (backupMs / 1000);
    ctx.emit({
      metric: 'plain_sequential_read_mib_s',
      value: round(readRate, 1),
      unit: 'MiB/s',
      params: { ...params, reads: '1 MiB pread, 8 in flight, cold' },
    });
    ctx.emit({
      metric: 'full_backup_mib_s',
      value: round(backupRate, 1),
      unit: 'MiB/s',
      params: { ...params, includes: 'metadata listing, reads, SHA-256, chunk writes, one syncfs, manifest commit' },
    });
    const share = backupRate / readRate;
    ctx.emit(
      targeted(
        { metric: 'full_backup_share_of_read', value: round(share, 3), unit: 'ratio', params },
        '>= 0.7',
        share >= 0.7,
      ),
    );
  } finally {
    await exposed.release();
  }
}

async function incrementalCase(ctx: SuiteContext, d: Driver, sizes: Sizes): Promise<void> {
  const volumeId = await d.volume('bench-inc', sizes.incrementalCapacity);
  const base = await d.snapshot(volumeId, 'bench-inc-1');
  const blocks = distinctSorted(prng(SEED), sizes.changes, sizes.incrementalCapacity / BLOCK);
  const p = await d.volumes.publish(volumeId);
  const fd = fs.openSync(p.device, 'r+');
  const data = randomBuffer(BLOCK, SEED + 1);
  for (const b of blocks) {
    data.writeUInt32LE(b, 0);
    fs.writeSync(fd, data, 0, BLOCK, b * BLOCK);
  }
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  await p.release();
  const target = await d.snapshot(volumeId, 'bench-inc-2');
  const repo = await BackupRepository.openOrCreate(path.join(ctx.dir, 'repo-inc'));
  const baseExposed = await d.volumes.expose(await d.volumes.snapshot(base));
  const { summary: full } = await backupOnce(d, repo, base, null, baseExposed).finally(() => baseExposed.release());
  const exposed = await d.volumes.expose(await d.volumes.snapshot(target));
  try {
    const readMs = await timedRead(
      exposed.device,
      [...blocks].map((b) => ({ offset: b * BLOCK, length: BLOCK })),
    );
    flushbufs(exposed.device);
    const started = performance.now();
    const { summary } = await backupOnce(d, repo, target, full.id, exposed);
    const backupMs = msSince(started);
    const params = {
      volume: sizeLabel(sizes.incrementalCapacity),
      changes: sizes.changes,
      change: '4KiB',
      quick: ctx.quick,
      extents: summary.extents,
      bytesRead: summary.bytesRead,
    };
    ctx.emit({
      metric: 'read_changed_blocks_ms',
      value: round(readMs, 1),
      unit: 'ms',
      params: { ...params, reads: '4 KiB pread, 8 in flight, cold' },
    });
    ctx.emit({
      metric: 'incremental_backup_ms',
      value: round(backupMs, 1),
      unit: 'ms',
      params: { ...params, includes: 'delta listing, reads, SHA-256, chunk writes, one syncfs, manifest commit' },
    });
    const ratio = backupMs / readMs;
    ctx.emit(
      targeted(
        { metric: 'incremental_backup_over_read', value: round(ratio, 2), unit: 'ratio', params },
        '<= 2',
        ratio <= 2,
      ),
    );
  } finally {
    await exposed.release();
  }
}

async function clientCase(ctx: SuiteContext, d: Driver, sizes: Sizes): Promise<void> {
  const capacity = sizes.clientExtents * BLOCK;
  const volumeId = await d.volume('bench-client', capacity, { metadataStyle: 'FIXED' });
  const p = await d.volumes.publish(volumeId);
  const r = spawnSync('dd', [
    'if=/dev/zero',
    `of=${p.device}`,
    'bs=64K',
    `count=${capacity / (64 * KiB)}`,
    'oflag=direct',
    'conv=fsync',
    'status=none',
  ]);
  if (r.status !== 0) throw new Error(`dd: ${r.stderr}`);
  await p.release();
  const snap = await d.snapshot(volumeId, 'bench-client-1');
  const client = connectCsiDirect(d.endpoint);
  try {
    const samples: number[] = [];
    for (let run = 0; run < 3; run++) {
      const started = performance.now();
      let n = 0;
      for await (const _ of await client.allocated(snap)) n++;
      const ms = msSince(started);
      if (n !== sizes.clientExtents) throw new Error(`expected ${sizes.clientExtents} extents, got ${n}`);
      samples.push(n / (ms / 1000));
    }
    const best = Math.max(...samples);
    const params = {
      extents: sizes.clientExtents,
      style: 'FIXED',
      maxResults: 'driver default',
      transport: 'CSI direct, unix socket',
      runs: 3,
      quick: ctx.quick,
    };
    ctx.emit(
      targeted(
        {
          metric: 'client_extents_per_s',
          value: Math.round(best),
          unit: 'extents/s',
          params: { ...params, of: 'best' },
        },
        '>= 1000000',
        best >= 1_000_000,
      ),
    );
  } finally {
    await client.close();
  }
}

export async function run(ctx: SuiteContext): Promise<void> {
  if (process.getuid?.() !== 0)
    throw new Error('the backup suite needs root: it publishes volumes through the Node service (losetup, /dev/fuse)');
  const sizes = ctx.quick ? QUICK : FULL;
  const d = await Driver.start(ctx.dir);
  try {
    const cases: [string, (ctx: SuiteContext, d: Driver, s: Sizes) => Promise<void>][] = [
      ['full', fullCase],
      ['incremental', incrementalCase],
      ['client', clientCase],
    ];
    for (const [name, body] of cases) {
      if (ctx.only && !ctx.only.has(name)) continue;
      ctx.log(`backup: ${name}`);
      await body(ctx, d, sizes);
    }
  } finally {
    await d.stop();
  }
}
