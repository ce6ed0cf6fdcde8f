/**
 * Backup suite: the backup toolkit against a driver child process (`cbt-csi serve`, all roles), through the
 * published block devices a backup reads. Needs root (the Node service); `--quick` shrinks every size.
 *
 * Cases (select with --only):
 *   full         a full backup of a fully written 1 GiB volume vs a plain sequential read of the same
 *                published device (target: backup ≥ 70% of the read's throughput); beside it, untargeted,
 *                a one-stream `dd bs=1M` of the device and an O_DIRECT read of it (the read a backup
 *                itself makes, without the page cache)
 *   incremental  an incremental of 10,000 scattered 4 KiB changes on a 16 GiB volume vs reading just those
 *                blocks from the same device (target: ≤ 2× the read's time)
 *   client       the client iterating a 1,000,000-extent FIXED listing over CSI direct (target ≥ 1 M/s)
 *   restore      restore and verify of a full backup of a fully written 1 GiB volume onto a fresh published
 *                device, beside a plain sequential write of it (untargeted)
 *
 * The repositories go in the suite's directory, on the same disk as the driver's store, unless
 * CBT_BENCH_REPO_DIR names another place (e.g. /dev/shm): a full backup writes every byte it reads, so on a
 * disk that writes slower than it reads, the repository's disk sets the full backup's pace, not the toolkit.
 *
 * Each timed read starts cold: the device's page cache is dropped (blockdev --flushbufs) before it. Each case
 * runs ROUNDS times (the full case FULL_ROUNDS, after a warm-up), read and backup side by side in every
 * round, and reports the median ratio with every sample; the CPU time both processes spent (this one, the client; the driver child, which serves the device
 * through FUSE) is reported beside the wall time, since on a shared machine wall time is mostly waiting for
 * a core.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { connectCsiDirect, type ExtentListing } from '../src/client/index.js';
import { openSource } from '../src/backup/block-target.js';
import { CHUNK_SIZE, planBackup, READS_IN_FLIGHT, writeBackup } from '../src/backup/backup-run.js';
import { HASH_THREADS } from '../src/backup/sha256-threads.js';
import { allocAligned } from '../src/backup/direct-io.js';
import { BLOCK_CAPABILITY, CsiVolumes, type ExposedSnapshot } from '../src/backup/csi-volumes.js';
import { createProgress } from '../src/backup/progress.js';
import { BackupRepository } from '../src/backup/repository.js';
import { restoreBackup } from '../src/backup/restore.js';
import { spawnDriver } from '../test/support/test-driver.js';
import {
  GiB,
  KiB,
  MiB,
  distinctSorted,
  median,
  msSince,
  prng,
  procCpuMs,
  randomBuffer,
  round,
  sizeLabel,
  targeted,
  type ParamValue,
  type Result,
  type SuiteContext,
} from './suite.js';

const SEED = 20261130;
const BLOCK = 4 * KiB;
/** Rounds of each case; the median is the figure. */
const ROUNDS = 3;
/**
 * Rounds of the full case, after one warm-up round that is not counted. On the dev VM a first read of fresh
 * memory costs ~3 µs a page (the host backs it on first touch), so which of the read and the backup meets
 * freshly freed memory swings either by up to 2×: more rounds, and the order rotating within a round.
 */
const FULL_ROUNDS = 5;

interface Sizes {
  fullBytes: number;
  incrementalCapacity: number;
  changes: number;
  clientExtents: number;
}

const FULL: Sizes = { fullBytes: GiB, incrementalCapacity: 16 * GiB, changes: 10_000, clientExtents: 1_000_000 };
const QUICK: Sizes = { fullBytes: 64 * MiB, incrementalCapacity: GiB, changes: 500, clientExtents: 16_384 };

const quiet = createProgress('quiet');

/** Where the benchmark's repositories go (see the header). */
function repoRoot(ctx: SuiteContext): string {
  const dir = process.env.CBT_BENCH_REPO_DIR;
  if (!dir) return ctx.dir;
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  return dir;
}

function flushbufs(device: string): void {
  const r = spawnSync('blockdev', ['--flushbufs', device], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`blockdev --flushbufs ${device}: ${r.stderr}`);
}

/** CPU milliseconds (user + system) a process has used so far, from /proc. */
function cpuMsOf(pid: number): number {
  const { user, sys } = procCpuMs(`/proc/${pid}/stat`);
  return user + sys;
}

/** Wall time and the CPU time this process (the client) and the driver child spent meanwhile. */
interface Timed {
  ms: number;
  clientCpuMs: number;
  driverCpuMs: number;
}

async function timed(d: Driver, body: () => Promise<unknown>): Promise<Timed> {
  const cpu0 = process.cpuUsage();
  const driver0 = cpuMsOf(d.child.pid!);
  const started = performance.now();
  await body();
  const ms = msSince(started);
  const cpu = process.cpuUsage(cpu0);
  return { ms, clientCpuMs: (cpu.user + cpu.system) / 1000, driverCpuMs: cpuMsOf(d.child.pid!) - driver0 };
}

/**
 * Reads the given ranges with the same positioned reads a backup makes, as many in flight as a backup
 * has (READS_IN_FLIGHT), starting cold: through the page cache as any program reads a device (`dd bs=1M`),
 * or, with `direct`, with O_DIRECT into page-aligned buffers as the backup itself reads.
 */
async function timedRead(
  d: Driver,
  device: string,
  ranges: { offset: number; length: number }[],
  direct = false,
): Promise<Timed> {
  flushbufs(device);
  const handle = await fs.promises.open(device, direct ? fs.constants.O_RDONLY | fs.constants.O_DIRECT : 'r');
  const buffers = direct ? allocAligned(MiB, READS_IN_FLIGHT) : undefined;
  try {
    return await timed(d, async () => {
      let next = 0;
      const worker = async (i: number) => {
        const buf = buffers?.[i] ?? Buffer.allocUnsafe(MiB);
        while (next < ranges.length) {
          const r = ranges[next++]!;
          await handle.read(buf, 0, r.length, r.offset);
        }
      };
      await Promise.all(Array.from({ length: READS_IN_FLIGHT }, (_, i) => worker(i)));
    });
  } finally {
    await handle.close();
  }
}

/**
 * The plainest sequential read there is, one stream through the page cache, as an operator would time a
 * device: `dd bs=1M` of the whole device, starting cold. dd's own CPU is not in clientCpuMs.
 */
async function timedDd(d: Driver, device: string): Promise<Timed> {
  flushbufs(device);
  return timed(d, async () => {
    const r = spawnSync('dd', [`if=${device}`, 'of=/dev/null', 'bs=1M', 'status=none'], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`dd of ${device}: ${r.stderr || r.error?.message}`);
  });
}

/** A MiB/s line for `bytes` done in each sample: the median's rate, every sample's time, both processes' CPU. */
function rateLine(metric: string, bytes: number, samples: Timed[], params: Record<string, ParamValue>): Result {
  return {
    metric,
    value: round(bytes / MiB / (medianOf(samples, 'ms') / 1000), 1),
    unit: 'MiB/s',
    params: {
      ...params,
      ms: samples.map((r) => round0(r.ms)).join(' '),
      clientCpuMs: medianOf(samples, 'clientCpuMs'),
      driverCpuMs: medianOf(samples, 'driverCpuMs'),
    },
  };
}

/** Median of each field over rounds, rounded for result lines. */
function medianOf(samples: Timed[], field: keyof Timed): number {
  return round(median(samples.map((t) => t[field])), 0);
}

/** The load average now: the machine is shared, so every figure carries it. */
function load1(): number {
  return round(fs.readFileSync('/proc/loadavg', 'utf8').split(' ').map(Number)[0]!, 2);
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

/** One backup as the command makes it; times the listing and the rest (reads, hashing, chunk writes, commit). */
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
    const baseManifest = base ? await repo.manifest(base) : null;
    let plan: Awaited<ReturnType<typeof planBackup>> | undefined;
    const listing = await timed(d, async () => {
      plan = await planBackup(client, snapshot, facts.sourceVolume, baseManifest);
    });
    const source = await openSource(exposed.device, plan!.capacityBytes);
    const lock = await repo.lock();
    try {
      let summary: Awaited<ReturnType<typeof writeBackup>> | undefined;
      const writing = await timed(d, async () => {
        summary = await writeBackup(repo, lock, plan!, source, quiet);
      });
      return { plan: plan!, summary: summary!, listing, writing };
    } finally {
      await lock.release();
      await source.close();
    }
  } finally {
    await client.close();
  }
}

/** Listing + writing, as one Timed. */
function total(b: { listing: Timed; writing: Timed }): Timed {
  return {
    ms: b.listing.ms + b.writing.ms,
    clientCpuMs: b.listing.clientCpuMs + b.writing.clientCpuMs,
    driverCpuMs: b.listing.driverCpuMs + b.writing.driverCpuMs,
  };
}

async function fullCase(ctx: SuiteContext, d: Driver, sizes: Sizes): Promise<void> {
  const volumeId = await d.volume('bench-full', sizes.fullBytes);
  const p = await d.volumes.publish(volumeId);
  fill(p.device, sizes.fullBytes);
  await p.release();
  const snap = await d.snapshot(volumeId, 'bench-full-1');
  const exposed = await d.volumes.expose(await d.volumes.snapshot(snap));
  try {
    const reads: Timed[] = [];
    const ddReads: Timed[] = [];
    const directReads: Timed[] = [];
    const backups: Timed[] = [];
    const lists: Timed[] = [];
    const commits: number[] = [];
    const shares: number[] = [];
    const directShares: number[] = [];
    const loads: number[] = [];
    let chunks = 0;
    const whole = Array.from({ length: sizes.fullBytes / MiB }, (_, i) => ({ offset: i * MiB, length: MiB }));
    for (let i = -1; i < FULL_ROUNDS; i++) {
      let read: Timed | undefined;
      let dd: Timed | undefined;
      let direct: Timed | undefined;
      let b: Awaited<ReturnType<typeof backupOnce>> | undefined;
      const steps: (() => Promise<void>)[] = [
        async () => {
          read = await timedRead(d, exposed.device, whole);
        },
        async () => {
          direct = await timedRead(d, exposed.device, whole, true);
        },
        async () => {
          dd = await timedDd(d, exposed.device);
        },
        async () => {
          // A fresh repository each round: nothing to deduplicate against.
          const repo = await BackupRepository.openOrCreate(path.join(repoRoot(ctx), `repo-full-${i}`));
          flushbufs(exposed.device);
          b = await backupOnce(d, repo, snap, null, exposed);
          fs.rmSync(repo.dir, { recursive: true, force: true });
        },
      ];
      for (let k = 0; k < steps.length; k++) await steps[(k + Math.max(0, i)) % steps.length]!();
      const backup = total(b!);
      const line = `read ${round0(read!.ms)} ms, dd ${round0(dd!.ms)} ms, O_DIRECT read ${round0(direct!.ms)} ms, backup ${round0(backup.ms)} ms`;
      if (i < 0) {
        ctx.log(`full warm-up round: ${line} (not counted)`);
        continue;
      }
      reads.push(read!);
      ddReads.push(dd!);
      directReads.push(direct!);
      backups.push(backup);
      lists.push(b!.listing);
      commits.push(b!.summary.commitSeconds * 1000);
      shares.push(read!.ms / backup.ms);
      directShares.push(direct!.ms / backup.ms);
      loads.push(load1());
      chunks = b!.summary.newChunks;
      ctx.log(`full round ${i + 1}: ${line} (share ${round(read!.ms / backup.ms, 3)}), load ${loads.at(-1)}`);
    }
    const params = {
      volume: sizeLabel(sizes.fullBytes),
      written: 'all',
      repository: repoRoot(ctx),
      chunk: sizeLabel(CHUNK_SIZE),
      chunks,
      rounds: FULL_ROUNDS,
      cores: os.availableParallelism(),
      hashThreads: HASH_THREADS,
      quick: ctx.quick,
      loads: loads.join(' '),
    };
    const reading = (how: string) => ({ ...params, reads: `1 MiB pread, ${READS_IN_FLIGHT} in flight, cold, ${how}` });
    ctx.emit(rateLine('plain_sequential_read_mib_s', sizes.fullBytes, reads, reading('through the page cache')));
    ctx.emit(
      rateLine('dd_sequential_read_mib_s', sizes.fullBytes, ddReads, {
        ...params,
        reads: 'dd bs=1M, one stream, cold, through the page cache; dd’s CPU not in clientCpuMs',
      }),
    );
    ctx.emit(rateLine('direct_sequential_read_mib_s', sizes.fullBytes, directReads, reading('O_DIRECT')));
    ctx.emit(
      rateLine('full_backup_mib_s', sizes.fullBytes, backups, {
        ...params,
        includes:
          'metadata listing, reads, SHA-256, chunk writes, background fsyncs, directory fsyncs, manifest commit',
        listingMs: medianOf(lists, 'ms'),
        commitMs: round0(median(commits)),
      }),
    );
    const share = median(shares);
    ctx.emit(
      targeted(
        {
          metric: 'full_backup_share_of_read',
          value: round(share, 3),
          unit: 'ratio',
          params: { ...params, of: 'median of rounds', samples: shares.map((x) => round(x, 3)).join(' ') },
        },
        '>= 0.7',
        share >= 0.7,
      ),
    );
    ctx.emit({
      metric: 'full_backup_share_of_direct_read',
      value: round(median(directShares), 3),
      unit: 'ratio',
      params: { ...params, of: 'median of rounds', samples: directShares.map((x) => round(x, 3)).join(' ') },
    });
  } finally {
    await exposed.release();
  }
}

function round0(ms: number): number {
  return Math.round(ms);
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
  const exposed = await d.volumes.expose(await d.volumes.snapshot(target));
  try {
    const reads: Timed[] = [];
    const backups: Timed[] = [];
    const lists: Timed[] = [];
    const commits: number[] = [];
    const ratios: number[] = [];
    const loads: number[] = [];
    let summary: Awaited<ReturnType<typeof writeBackup>> | undefined;
    for (let i = 0; i < ROUNDS; i++) {
      // A fresh repository each round, with a full backup of the base (an empty volume) to build on.
      const repo = await BackupRepository.openOrCreate(path.join(repoRoot(ctx), `repo-inc-${i}`));
      const baseExposed = await d.volumes.expose(await d.volumes.snapshot(base));
      const { summary: full } = await backupOnce(d, repo, base, null, baseExposed).finally(() => baseExposed.release());
      const read = await timedRead(
        d,
        exposed.device,
        [...blocks].map((b) => ({ offset: b * BLOCK, length: BLOCK })),
      );
      flushbufs(exposed.device);
      const b = await backupOnce(d, repo, target, full.id, exposed);
      const backup = total(b);
      fs.rmSync(repo.dir, { recursive: true, force: true });
      summary = b.summary;
      reads.push(read);
      backups.push(backup);
      lists.push(b.listing);
      commits.push(b.summary.commitSeconds * 1000);
      ratios.push(backup.ms / read.ms);
      loads.push(load1());
      ctx.log(
        `incremental round ${i + 1}: read ${round0(read.ms)} ms, backup ${round0(backup.ms)} ms (ratio ${round(backup.ms / read.ms, 2)}), load ${loads.at(-1)}`,
      );
    }
    const params = {
      volume: sizeLabel(sizes.incrementalCapacity),
      changes: sizes.changes,
      change: '4KiB',
      rounds: ROUNDS,
      quick: ctx.quick,
      extents: summary!.extents,
      chunks: summary!.newChunks,
      bytesRead: summary!.bytesRead,
      loads: loads.join(' '),
    };
    ctx.emit({
      metric: 'read_changed_blocks_ms',
      value: medianOf(reads, 'ms'),
      unit: 'ms',
      params: {
        ...params,
        reads: `4 KiB pread, ${READS_IN_FLIGHT} in flight, cold`,
        ms: reads.map((r) => round0(r.ms)).join(' '),
        clientCpuMs: medianOf(reads, 'clientCpuMs'),
        driverCpuMs: medianOf(reads, 'driverCpuMs'),
      },
    });
    ctx.emit({
      metric: 'incremental_backup_ms',
      value: medianOf(backups, 'ms'),
      unit: 'ms',
      params: {
        ...params,
        includes: 'delta listing, reads, SHA-256, chunk writes, fsyncs, manifest commit',
        ms: backups.map((r) => round0(r.ms)).join(' '),
        listingMs: medianOf(lists, 'ms'),
        commitMs: round0(median(commits)),
        clientCpuMs: medianOf(backups, 'clientCpuMs'),
        driverCpuMs: medianOf(backups, 'driverCpuMs'),
      },
    });
    const ratio = median(ratios);
    ctx.emit(
      targeted(
        {
          metric: 'incremental_backup_over_read',
          value: round(ratio, 2),
          unit: 'ratio',
          params: { ...params, of: 'median of rounds', samples: ratios.map((x) => round(x, 2)).join(' ') },
        },
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
    // Both ways a caller can iterate: one extent at a time (for await ... of listing), and batches().
    const ways: [string, (listing: ExtentListing) => Promise<number>][] = [
      [
        'extent',
        async (listing) => {
          let n = 0;
          for await (const _ of listing) n++;
          return n;
        },
      ],
      [
        'batch',
        async (listing) => {
          let n = 0;
          for await (const batch of listing.batches()) n += batch.length;
          return n;
        },
      ],
    ];
    for (const [way, iterate] of ways) {
      const runs: Timed[] = [];
      const loads: number[] = [];
      for (let run = 0; run < ROUNDS; run++) {
        let n = 0;
        runs.push(await timed(d, async () => (n = await iterate(await client.allocated(snap)))));
        if (n !== sizes.clientExtents) throw new Error(`expected ${sizes.clientExtents} extents, got ${n}`);
        loads.push(load1());
      }
      const perS = (ms: number) => Math.round(sizes.clientExtents / (ms / 1000));
      const rate = perS(median(runs.map((r) => r.ms)));
      ctx.emit(
        targeted(
          {
            metric: way === 'extent' ? 'client_extents_per_s' : 'client_extents_per_s_batches',
            value: rate,
            unit: 'extents/s',
            params: {
              extents: sizes.clientExtents,
              style: 'FIXED',
              maxResults: 'driver default',
              transport: 'CSI direct, unix socket',
              iteration: way === 'extent' ? 'for await of listing' : 'for await of listing.batches()',
              runs: ROUNDS,
              of: 'median',
              samples: runs.map((r) => perS(r.ms)).join(' '),
              // What the rate would be with a core each: extents per CPU-second of either process.
              clientExtentsPerCpuS: perS(median(runs.map((r) => r.clientCpuMs))),
              driverExtentsPerCpuS: perS(median(runs.map((r) => r.driverCpuMs))),
              quick: ctx.quick,
              loads: loads.join(' '),
            },
          },
          '>= 1000000',
          rate >= 1_000_000,
        ),
      );
    }
  } finally {
    await client.close();
  }
}

/**
 * Restore and verify of a full backup of a fully written volume, onto a fresh volume published as a block
 * device (as a vendor restores into a new PVC), beside a plain sequential write of that device.
 */
async function restoreCase(ctx: SuiteContext, d: Driver, sizes: Sizes): Promise<void> {
  const volumeId = await d.volume('bench-restore', sizes.fullBytes);
  const p = await d.volumes.publish(volumeId);
  fill(p.device, sizes.fullBytes);
  await p.release();
  const snap = await d.snapshot(volumeId, 'bench-restore-1');
  const repo = await BackupRepository.openOrCreate(path.join(repoRoot(ctx), 'repo-restore'));
  const exposed = await d.volumes.expose(await d.volumes.snapshot(snap));
  const { summary } = await backupOnce(d, repo, snap, null, exposed).finally(() => exposed.release());
  const target = await d.volumes.publish(await d.volume('bench-restore-target', sizes.fullBytes));
  try {
    const writes: Timed[] = [];
    const restores: Timed[] = [];
    const verifies: Timed[] = [];
    const loads: number[] = [];
    const data = randomBuffer(MiB, SEED + 2);
    for (let i = 0; i < ROUNDS; i++) {
      // As `dd bs=1M conv=fsync` writes: through the page cache, one fsync at the end.
      writes.push(
        await timed(d, async () => {
          const handle = await fs.promises.open(target.device, 'r+');
          try {
            let next = 0;
            const worker = async () => {
              while (next < sizes.fullBytes / MiB) await handle.write(data, 0, MiB, MiB * next++);
            };
            await Promise.all(Array.from({ length: READS_IN_FLIGHT }, worker));
            await handle.sync();
          } finally {
            await handle.close();
          }
        }),
      );
      flushbufs(target.device);
      restores.push(await timed(d, () => restoreBackup(repo, summary.id, target.device, quiet)));
      verifies.push(await timed(d, () => repo.verify([summary.id])));
      loads.push(load1());
      ctx.log(
        `restore round ${i + 1}: write ${round0(writes.at(-1)!.ms)} ms, restore ${round0(restores.at(-1)!.ms)} ms, verify ${round0(verifies.at(-1)!.ms)} ms, load ${loads.at(-1)}`,
      );
    }
    const params = {
      volume: sizeLabel(sizes.fullBytes),
      repository: repoRoot(ctx),
      chunks: summary.newChunks,
      rounds: ROUNDS,
      hashThreads: HASH_THREADS,
      quick: ctx.quick,
      loads: loads.join(' '),
    };
    const what = `1 MiB pwrite, ${READS_IN_FLIGHT} in flight, through the page cache, fsync`;
    ctx.emit(rateLine('plain_sequential_write_mib_s', sizes.fullBytes, writes, { ...params, what }));
    ctx.emit(
      rateLine('restore_mib_s', sizes.fullBytes, restores, {
        ...params,
        what: 'chunk reads, SHA-256 checks, writes to the published device, fsync',
      }),
    );
    ctx.emit(
      rateLine('verify_mib_s', sizes.fullBytes, verifies, { ...params, what: 'chunk reads and SHA-256 checks' }),
    );
  } finally {
    await target.release();
    fs.rmSync(repo.dir, { recursive: true, force: true });
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
      ['restore', restoreCase],
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
