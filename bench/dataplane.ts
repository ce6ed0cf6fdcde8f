/**
 * Data-plane suite: what a pod sees through /dev/loopN of a published block volume, against the same disk
 * without the driver in between. The driver runs as a child (`cbt-csi serve`, role all): it answers the
 * kernel's FUSE requests (on its I/O threads and its main thread), so nothing doing I/O on its devices may
 * share its process.
 * I/O comes from fio (libaio, O_DIRECT), as from a pod; the RPCs from grpc-js clients over the unix socket.
 *
 * Cases (select with --only):
 *   throughput  sequential 1 MiB writes (fsync inside the timing) and reads, 4 KiB random writes, reads and
 *               a 70/30 mix: the published device vs a plain file next to the driver's state directory,
 *               with the driver's CPU per request (CBT_BENCH_DRIVER_CPU_PROF=<dir> also profiles it)
 *   block-e2e   a 16 GiB block volume: random 4 KiB writes, CreateSnapshot, more writes, CreateSnapshot,
 *               GetMetadataDelta; RPC latencies, and the delta checked against fio's log of what it wrote
 *
 * Needs root, /dev/fuse, loop devices, util-linux and fio. Without them the suite fails with the reason:
 * a benchmark that skips silently reads like one that passed.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Controller, Node, SnapshotMetadata, VolumeCapability_AccessMode_Mode } from '../src/gen/csi/v1/csi_pb.js';
import { decodeMetadataResponse } from '../src/client/metadata-wire.js';
import { parseMountInfo } from '../src/dataplane/fuse/mount.js';
import { ServiceClient } from '../test/support/csi-client.js';
import {
  GiB,
  KiB,
  median,
  MiB,
  msSince,
  procCpuMs,
  round,
  sizeLabel,
  targeted,
  type ParamValue,
  type Result,
  type SuiteContext,
} from './suite.js';

const BLOCK = 4 * KiB;
const SEED = 20261124;
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TOOLS: ReadonlyArray<readonly [string, string]> = [
  ['losetup', 'util-linux'],
  ['mount', 'util-linux'],
  ['umount', 'util-linux'],
  ['findmnt', 'util-linux'],
  ['dd', 'coreutils'],
  ['fio', 'fio (apt-get install -y fio)'],
];

interface Sizes {
  /** Bytes of each sequential pass, and the region the random writes land in. */
  seqBytes: number;
  randomRuntimeS: number;
  randomRampS: number;
  e2eCapacity: number;
  blocksPerPhase: number;
  deltaReps: number;
}

const FULL: Sizes = {
  seqBytes: 4 * GiB,
  randomRuntimeS: 20,
  randomRampS: 2,
  e2eCapacity: 16 * GiB,
  blocksPerPhase: 2000,
  deltaReps: 9,
};
const QUICK: Sizes = {
  seqBytes: 256 * MiB,
  randomRuntimeS: 3,
  randomRampS: 0,
  e2eCapacity: GiB,
  blocksPerPhase: 500,
  deltaReps: 3,
};

function onPath(tool: string): boolean {
  return (process.env.PATH ?? '').split(':').some((d) => d !== '' && fs.existsSync(path.join(d, tool)));
}

/** Why this machine cannot run the suite, or undefined if it can. */
function missingPrerequisite(): string | undefined {
  if (process.platform !== 'linux') return 'the node data plane needs Linux';
  if (process.getuid?.() !== 0) return 'it needs root (losetup, mount, /dev/fuse); run it as root';
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing';
  if (!fs.existsSync('/dev/loop-control')) return 'loop devices are missing (/dev/loop-control)';
  for (const [tool, pkg] of TOOLS) if (!onPath(tool)) return `${tool} is not on PATH (install ${pkg})`;
  return undefined;
}

// ---------------------------------------------------------------------------------------------------------------
// Child processes: tools and fio.

/** Children still running, for the exit handler: an interrupted run must not leave fio writing to a device. */
const running = new Set<ChildProcess>();

function runTool(command: string, args: readonly string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', (err) => {
      running.delete(child);
      reject(err);
    });
    child.on('close', (code, signal) => {
      running.delete(child);
      if (code === 0) resolve(stdout);
      else
        reject(
          new Error(`${command} ${args.join(' ')} exited with ${code ?? signal}: ${stderr.trim() || stdout.trim()}`),
        );
    });
  });
}

/** The figures of one direction of one fio job. */
interface FioSide {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  runtime: number;
  clat_ns: { mean: number; percentile?: Record<string, number> };
}

interface FioJobReport {
  jobname: string;
  error: number;
  read: FioSide;
  write: FioSide;
  sync?: { total_ios: number; lat_ns: { mean: number; max: number } };
}

interface FioJob {
  filename: string;
  rw: 'write' | 'read' | 'randwrite' | 'randread' | 'randrw';
  /** Percentage of reads in a randrw job. */
  rwmixread?: number;
  bs: number;
  /** The region the job works in. */
  size: number;
  /** Stop after this many bytes (random jobs on a big region). */
  ioSize?: number;
  runtimeS?: number;
  rampS?: number;
  endFsync?: boolean;
  randseed?: number;
  writeIolog?: string;
}

const FIO_COMMON = { ioengine: 'libaio', direct: 1, iodepth: 32 } as const;

/** fio settings as they go into params, so a figure says how it was made. */
function fioParams(job: FioJob): Record<string, ParamValue> {
  return {
    tool: 'fio',
    ioengine: FIO_COMMON.ioengine,
    direct: true,
    iodepth: FIO_COMMON.iodepth,
    bs: sizeLabel(job.bs),
    region: sizeLabel(job.size),
    ...(job.rwmixread !== undefined ? { rwmixread: job.rwmixread } : {}),
    ...(job.runtimeS !== undefined
      ? { runtimeS: job.runtimeS, rampS: job.rampS ?? 0 }
      : { bytes: job.ioSize ?? job.size }),
  };
}

async function fio(job: FioJob): Promise<FioJobReport> {
  const args = [
    '--output-format=json',
    '--name=bench',
    `--filename=${job.filename}`,
    `--ioengine=${FIO_COMMON.ioengine}`,
    `--direct=${FIO_COMMON.direct}`,
    `--iodepth=${FIO_COMMON.iodepth}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--size=${job.size}`,
    '--numjobs=1',
  ];
  if (job.ioSize !== undefined) args.push(`--io_size=${job.ioSize}`);
  if (job.runtimeS !== undefined)
    args.push('--time_based=1', `--runtime=${job.runtimeS}`, `--ramp_time=${job.rampS ?? 0}`);
  // fio counts end_fsync in the job's runtime (checked: 1 GiB buffered, 0.37 s without, 2.7 s with).
  if (job.endFsync) args.push('--end_fsync=1');
  if (job.rwmixread !== undefined) args.push(`--rwmixread=${job.rwmixread}`);
  if (job.randseed !== undefined) args.push(`--randseed=${job.randseed}`);
  if (job.writeIolog !== undefined) args.push(`--write_iolog=${job.writeIolog}`);
  const stdout = await runTool('fio', args);
  // fio may print notes before its JSON.
  const start = stdout.indexOf('{');
  if (start < 0) throw new Error(`fio printed no JSON: ${stdout.slice(0, 500)}`);
  const report = JSON.parse(stdout.slice(start)) as { jobs?: FioJobReport[] };
  const result = report.jobs?.[0];
  if (!result) throw new Error('fio JSON has no job');
  if (result.error !== 0) throw new Error(`fio job on ${job.filename} failed with error ${result.error}`);
  return result;
}

/** The 4 KiB blocks a fio job wrote, from its iolog (version 2 or 3: "[time] file action offset length"). */
function blocksFromIolog(file: string): Set<number> {
  const blocks = new Set<number>();
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const t = line.trim().split(/\s+/);
    if (t.length < 4 || t[t.length - 3] !== 'write') continue;
    const offset = Number(t[t.length - 2]);
    const length = Number(t[t.length - 1]);
    for (let b = Math.floor(offset / BLOCK); b < Math.ceil((offset + length) / BLOCK); b++) blocks.add(b);
  }
  return blocks;
}

// ---------------------------------------------------------------------------------------------------------------
// The driver child and what it has been asked to set up, so that all of it can be undone.

interface Published {
  volumeId: string;
  staging: string;
  target: string;
  /** /dev/loopN behind the target. */
  device: string;
  stageMs: number;
  publishMs: number;
}

const blockCapability = {
  accessType: { case: 'block' as const, value: {} },
  accessMode: { mode: VolumeCapability_AccessMode_Mode.SINGLE_NODE_WRITER },
};

class DataPlaneDriver {
  readonly controller: ServiceClient<typeof Controller>;
  readonly node: ServiceClient<typeof Node>;
  readonly metadata: ServiceClient<typeof SnapshotMetadata>;
  private readonly volumes = new Set<string>();
  private readonly snapshots = new Set<string>();
  private readonly staged = new Map<string, string>();
  private readonly published = new Map<string, { volumeId: string; target: string }>();

  private constructor(
    readonly dir: string,
    readonly stateDir: string,
    private readonly child: ChildProcess,
    target: string,
  ) {
    this.controller = new ServiceClient(Controller, target);
    this.node = new ServiceClient(Node, target);
    this.metadata = new ServiceClient(SnapshotMetadata, target);
  }

  static async start(dir: string, log: (m: string) => void): Promise<DataPlaneDriver> {
    const stateDir = path.join(dir, 'state');
    const socket = path.join(dir, 'csi.sock');
    const args = [
      '--endpoint',
      `unix://${socket}`,
      '--state-dir',
      stateDir,
      '--node-id',
      'bench-node',
      '--log-level',
      'warn',
    ];
    // CBT_BENCH_DRIVER_CPU_PROF=<dir>: the driver writes V8 CPU profiles there (one a thread) when it stops.
    const profileDir = process.env.CBT_BENCH_DRIVER_CPU_PROF;
    const nodeArgs = profileDir ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(profileDir)}`] : [];
    if (profileDir) log(`driver CPU profiles go to ${path.resolve(profileDir)}`);
    // CBT_BENCH_COMPILED=1: the compiled driver (`npm run build` first), as the image runs it; by default the
    // sources through tsx, whose loader makes the first NodeStageVolume slow (each I/O thread loads it).
    const compiled = process.env.CBT_BENCH_COMPILED === '1';
    const entry = compiled ? path.join(ROOT, 'dist/src/cli.js') : path.join(ROOT, 'src/cli.ts');
    if (compiled && !fs.existsSync(entry))
      throw new Error(`CBT_BENCH_COMPILED=1 but ${entry} is missing: npm run build`);
    log(`driver: ${compiled ? 'compiled (dist/)' : 'sources through tsx'}`);
    const child = spawn(
      process.execPath,
      [...nodeArgs, ...(compiled ? [] : ['--import', 'tsx']), entry, 'serve', ...args],
      {
        cwd: ROOT,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let ready = false;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error('driver did not start in 30 s'));
      }, 30_000);
      child.stdout.setEncoding('utf8').on('data', (s: string) => log(`driver stdout: ${s.trimEnd()}`));
      child.stderr.setEncoding('utf8').on('data', (s: string) => {
        for (const line of s.split('\n')) if (line !== '') log(`driver: ${line}`);
        if (!ready && s.includes('listening on')) {
          ready = true;
          clearTimeout(timer);
          resolve();
        }
      });
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        if (!ready) reject(new Error(`driver exited with ${code ?? signal} before it was listening`));
        else log(`driver exited with ${code ?? signal}`);
      });
    });
    return new DataPlaneDriver(dir, stateDir, child, `unix://${socket}`);
  }

  /**
   * CPU time the driver has used so far, in ms, from /proc/<pid>/task/<tid>/stat: its main thread (tid = pid)
   * and all its other threads (the FUSE I/O threads, and libuv's and V8's), user and system apart.
   */
  cpu(): DriverCpu {
    const pid = this.child.pid!;
    const total: DriverCpu = { mainUser: 0, mainSys: 0, threadsUser: 0, threadsSys: 0 };
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      let user: number;
      let sys: number;
      try {
        ({ user, sys } = procCpuMs(`/proc/${pid}/task/${tid}/stat`));
      } catch {
        continue; // the thread ended meanwhile
      }
      if (Number(tid) === pid) {
        total.mainUser += user;
        total.mainSys += sys;
      } else {
        total.threadsUser += user;
        total.threadsSys += sys;
      }
    }
    return total;
  }

  async createBlockVolume(name: string, capacityBytes: number): Promise<string> {
    const res = await this.controller.call('createVolume', {
      name,
      capacityRange: { requiredBytes: BigInt(capacityBytes) },
      volumeCapabilities: [blockCapability],
      parameters: { metadataStyle: 'VARIABLE', blockSize: String(BLOCK) },
    });
    const volumeId = res.volume!.volumeId;
    this.volumes.add(volumeId);
    return volumeId;
  }

  async stageAndPublish(volumeId: string, name: string): Promise<Published> {
    const staging = path.join(this.dir, 'staging', name);
    const target = path.join(this.dir, 'pods', name);
    fs.mkdirSync(staging, { recursive: true });
    fs.mkdirSync(path.dirname(target), { recursive: true });
    const t0 = performance.now();
    await this.node.call('nodeStageVolume', {
      volumeId,
      stagingTargetPath: staging,
      volumeCapability: blockCapability,
    });
    const stageMs = msSince(t0);
    this.staged.set(volumeId, staging);
    const t1 = performance.now();
    await this.node.call('nodePublishVolume', {
      volumeId,
      stagingTargetPath: staging,
      targetPath: target,
      volumeCapability: blockCapability,
    });
    const publishMs = msSince(t1);
    this.published.set(target, { volumeId, target });
    // The target is a bind mount of the device node: its rdev names the loop device.
    const rdev = fs.statSync(target).rdev;
    const device = loopDevicesUnder(this.stateDir).find((d) => fs.statSync(d.name).rdev === rdev)?.name ?? 'unknown';
    return { volumeId, staging, target, device, stageMs, publishMs };
  }

  async release(p: Published): Promise<void> {
    await this.node.call('nodeUnpublishVolume', { volumeId: p.volumeId, targetPath: p.target });
    this.published.delete(p.target);
    await this.node.call('nodeUnstageVolume', { volumeId: p.volumeId, stagingTargetPath: p.staging });
    this.staged.delete(p.volumeId);
  }

  async createSnapshot(sourceVolumeId: string, name: string): Promise<{ snapshotId: string; ms: number }> {
    const t0 = performance.now();
    const res = await this.controller.call('createSnapshot', { sourceVolumeId, name });
    const ms = msSince(t0);
    const snapshotId = res.snapshot!.snapshotId;
    this.snapshots.add(snapshotId);
    return { snapshotId, ms };
  }

  async deleteVolume(volumeId: string): Promise<void> {
    await this.controller.call('deleteVolume', { volumeId });
    this.volumes.delete(volumeId);
  }

  /**
   * Undoes everything still set up, in order, through the RPCs; then stops the driver (SIGTERM, which
   * unmounts its FUSE mount) and removes whatever the RPCs could not. Every step runs even if one fails;
   * the first failure is rethrown at the end.
   */
  async teardown(log: (m: string) => void): Promise<void> {
    const errors: unknown[] = [];
    const attempt = async (what: string, fn: () => Promise<unknown>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        errors.push(err);
        log(`cleanup: ${what} failed: ${err instanceof Error ? err.message : String(err)}`);
      }
    };
    for (const p of [...this.published.values()]) {
      await attempt(`unpublish ${p.target}`, () =>
        this.node.call('nodeUnpublishVolume', { volumeId: p.volumeId, targetPath: p.target }),
      );
    }
    for (const [volumeId, staging] of [...this.staged]) {
      await attempt(`unstage ${volumeId}`, () =>
        this.node.call('nodeUnstageVolume', { volumeId, stagingTargetPath: staging }),
      );
    }
    for (const snapshotId of [...this.snapshots]) {
      await attempt(`delete snapshot ${snapshotId}`, () => this.controller.call('deleteSnapshot', { snapshotId }));
    }
    for (const volumeId of [...this.volumes]) {
      await attempt(`delete volume ${volumeId}`, () => this.controller.call('deleteVolume', { volumeId }));
    }
    // Listed while the driver's mount still names them: afterwards their backing files have no path under it.
    const devices = loopDevicesUnder(this.stateDir).map((d) => d.name);
    if (devices.length > 0) log(`cleanup: loop devices left after unstage: ${devices.join(', ')}`);
    await attempt('stop the driver', () => this.stop());
    // The driver is gone now, so a FUSE mount still here is a dead one and goes too.
    const left = sweep(this.dir, devices, true);
    if (left > 0)
      errors.push(new Error(`cleanup: ${left} mounts or loop devices were left behind and had to be removed`));
    if (errors.length > 0) throw errors[0];
  }

  private async stop(): Promise<void> {
    for (const c of [this.controller, this.node, this.metadata]) c.close();
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => this.child.once('exit', () => resolve()));
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), 30_000);
    await exited;
    clearTimeout(timer);
  }

  /**
   * For the process's exit handler (a signal ended the run): synchronous, so no RPCs. Detaches the devices
   * and unmounts everything, FUSE mount included, then kills the driver; the runner then removes the dir.
   */
  emergencyCleanup(): void {
    for (const child of running) child.kill('SIGKILL');
    const devices = loopDevicesUnder(this.stateDir).map((d) => d.name);
    sweep(this.dir, devices, true);
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}

/** Loop devices attached to files of the driver's FUSE mount under `stateDir`. */
function loopDevicesUnder(stateDir: string): Array<{ name: string; backFile: string }> {
  const list = spawnSync('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE'], { encoding: 'utf8' });
  if (list.status !== 0 || list.stdout.trim() === '') return [];
  const devices = (JSON.parse(list.stdout) as { loopdevices?: Array<Record<string, unknown>> }).loopdevices ?? [];
  const prefix = `${path.join(stateDir, 'fuse')}/`;
  return devices
    .map((d) => ({ name: String(d.name), backFile: String(d['back-file']) }))
    .filter((d) => d.backFile.startsWith(prefix));
}

/**
 * Lazily unmounts whatever is mounted under `dir` (the FUSE mount only when `withFuse`) and detaches
 * `devices`. Returns how many things it had to remove.
 */
function sweep(dir: string, devices: readonly string[], withFuse = false): number {
  const mounts = parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8'))
    .filter((m) => m.mountPoint === dir || m.mountPoint.startsWith(`${dir}/`))
    .reverse();
  const plain = mounts.filter((m) => !m.fsType.startsWith('fuse'));
  const fuse = withFuse ? mounts.filter((m) => m.fsType.startsWith('fuse')) : [];
  for (const m of plain) spawnSync('umount', ['-l', m.mountPoint]);
  for (const d of devices) spawnSync('losetup', ['-d', d]);
  for (const m of fuse) spawnSync('umount', ['-l', m.mountPoint]);
  return plain.length + fuse.length + devices.length;
}

/**
 * Drops the engine's files from the page cache (fadvise DONTNEED through dd), so a read through the device
 * reaches the disk as the O_DIRECT read of the plain file does, instead of the memory it was written to.
 * Only the driver's files: dropping the whole machine's cache would slow everyone else's work.
 */
async function dropEngineCache(stateDir: string): Promise<number> {
  await runTool('sync', ['-f', stateDir]);
  const mountPoints = new Set(parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8')).map((m) => m.mountPoint));
  let files = 0;
  const walk = async (dir: string): Promise<void> => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory() && !mountPoints.has(full)) await walk(full);
      else if (entry.isFile()) {
        await runTool('dd', [`if=${full}`, 'iflag=nocache', 'count=0', 'status=none']);
        files++;
      }
    }
  };
  await walk(stateDir);
  return files;
}

function fsTypeOf(dir: string): string {
  const r = spawnSync('findmnt', ['--noheadings', '--output', 'FSTYPE', '--target', dir], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : 'unknown';
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Throughput: the device against a plain file on the same disk.

/** A driver's CPU time so far, ms (see DataPlaneDriver.cpu). */
interface DriverCpu {
  mainUser: number;
  mainSys: number;
  threadsUser: number;
  threadsSys: number;
}

/**
 * The driver's CPU per request fio completed, µs: what the data plane costs whatever else the machine does
 * (clock ticks are 10 ms, so a pass needs thousands of requests). Only the device's passes have it: the plain
 * file bypasses the driver.
 */
function cpuPerIo(before: DriverCpu, after: DriverCpu, ios: number): Record<string, ParamValue> {
  const us = (key: keyof DriverCpu): number => round(((after[key] - before[key]) * 1000) / ios, 1);
  const main = us('mainUser') + us('mainSys');
  const threads = us('threadsUser') + us('threadsSys');
  return {
    driverCpuUsPerIo: round(main + threads, 1),
    mainThreadUserUsPerIo: us('mainUser'),
    mainThreadSysUsPerIo: us('mainSys'),
    otherThreadsUserUsPerIo: us('threadsUser'),
    otherThreadsSysUsPerIo: us('threadsSys'),
  };
}

/** One pass of the throughput case: fio on the device and on the plain file, or on the device only. */
interface ThroughputPass {
  name: string;
  job: Omit<FioJob, 'filename'>;
  /** What is measured: MB/s for sequential passes, IOPS for random ones. */
  measure: 'MBps' | 'iops';
  /** Drop the engine's files from the page cache first (cold reads, like O_DIRECT on the plain file). */
  coldEngine?: boolean;
  /** Run on the device only (a variant of the pass before). */
  loopOnly?: boolean;
  /** The goal for the device: a ratio to the plain file, or an absolute figure. */
  target?: { kind: 'ratio' | 'absolute'; min: number };
  notes: Record<string, ParamValue>;
}

function throughputPasses(sizes: Sizes): ThroughputPass[] {
  const random = { bs: BLOCK, size: sizes.seqBytes, runtimeS: sizes.randomRuntimeS, rampS: sizes.randomRampS };
  return [
    {
      name: 'seq_write',
      job: { rw: 'write', bs: MiB, size: sizes.seqBytes, endFsync: true },
      measure: 'MBps',
      target: { kind: 'ratio', min: 0.85 },
      notes: { fsync: 'end_fsync, inside the timing' },
    },
    {
      name: 'seq_read',
      job: { rw: 'read', bs: MiB, size: sizes.seqBytes },
      measure: 'MBps',
      coldEngine: true,
      target: { kind: 'ratio', min: 0.85 },
      notes: {
        data: 'the sequential write pass just before',
        cache: 'engine files dropped from the page cache first (dd iflag=nocache)',
      },
    },
    {
      name: 'seq_read_cached',
      job: { rw: 'read', bs: MiB, size: sizes.seqBytes },
      measure: 'MBps',
      loopOnly: true,
      notes: {
        cache: 'as the cold read just before left the engine files (it reads the head with O_DIRECT, ADR 0010)',
      },
    },
    {
      name: 'random_write_4k',
      job: { rw: 'randwrite', ...random, randseed: SEED },
      measure: 'iops',
      target: { kind: 'absolute', min: 50_000 },
      notes: { fsync: 'none' },
    },
    {
      name: 'random_read_4k',
      job: { rw: 'randread', ...random, randseed: SEED + 1 },
      measure: 'iops',
      target: { kind: 'absolute', min: 50_000 },
      notes: {
        cache:
          'engine files as the passes before left them (large reads of the head bypass the cache, ADR 0010); the plain file is O_DIRECT',
      },
    },
    {
      name: 'mixed_70_30_4k',
      job: { rw: 'randrw', rwmixread: 70, ...random, randseed: SEED + 2 },
      measure: 'iops',
      notes: { mix: '70% reads, 30% writes', cache: 'as random_read_4k' },
    },
  ];
}

async function throughput(ctx: SuiteContext, d: DataPlaneDriver, sizes: Sizes): Promise<void> {
  const volumeId = await d.createBlockVolume('throughput', sizes.seqBytes);
  const published = await d.stageAndPublish(volumeId, 'throughput');
  // Next to the state directory: the same file system the engine's layer files live on.
  const plainFile = path.join(path.dirname(d.stateDir), 'plain.img');
  const common = {
    capacity: sizeLabel(sizes.seqBytes),
    device: published.device,
    plainFile,
    fsType: fsTypeOf(path.dirname(d.stateDir)),
    quick: ctx.quick,
  };
  const targets = [
    { kind: 'loop', filename: published.target },
    { kind: 'file', filename: plainFile },
  ] as const;

  for (const pass of throughputPasses(sizes)) {
    const figures = new Map<string, number>();
    for (const t of pass.loopOnly ? targets.slice(0, 1) : targets) {
      const dropped = pass.coldEngine ? await dropEngineCache(d.stateDir) : undefined;
      const job: FioJob = { filename: t.filename, ...pass.job };
      const cpu0 = d.cpu();
      const r = await fio(job);
      const cpu1 = d.cpu();
      const sides = [r.read, r.write].filter((side) => side.io_bytes > 0);
      const bytes = sides.reduce((sum, side) => sum + side.io_bytes, 0);
      const runtimeMs = Math.max(...sides.map((side) => side.runtime));
      const ios = sides.reduce((sum, side) => sum + side.iops * (side.runtime / 1000), 0);
      const value = pass.measure === 'MBps' ? bytes / 1e6 / (runtimeMs / 1000) : ios / (runtimeMs / 1000);
      figures.set(t.kind, value);
      ctx.log(`${pass.name} ${t.kind}: ${value.toFixed(0)} ${pass.measure === 'MBps' ? 'MB/s' : 'IOPS'}`);
      const clat = sides.map((side) => side.clat_ns.mean / 1000);
      const result: Result = {
        metric: `${pass.name}_${t.kind}_${pass.measure === 'MBps' ? 'MBps' : 'iops'}`,
        value: pass.measure === 'MBps' ? round(value, 1) : Math.round(value),
        unit: pass.measure === 'MBps' ? 'MB/s' : 'IOPS',
        params: {
          ...fioParams(job),
          ...common,
          ...pass.notes,
          ...(dropped !== undefined ? { droppedFiles: dropped } : {}),
          runtimeMs,
          clatMeanUs: round(Math.max(...clat), 1),
          ...(t.kind === 'loop' ? cpuPerIo(cpu0, cpu1, ios) : {}),
        },
      };
      const target = pass.target;
      ctx.emit(
        t.kind === 'loop' && target?.kind === 'absolute'
          ? targeted(result, `>= ${target.min} IOPS`, value >= target.min)
          : result,
      );
    }
    if (!pass.loopOnly) {
      const ratio = figures.get('loop')! / figures.get('file')!;
      const result: Result = {
        metric: `${pass.name}_loop_vs_file`,
        value: round(ratio),
        unit: 'x',
        params: { bs: sizeLabel(pass.job.bs), ...common },
      };
      ctx.emit(
        pass.target?.kind === 'ratio' ? targeted(result, `>= ${pass.target.min}`, ratio >= pass.target.min) : result,
      );
    }
  }

  await d.release(published);
  await d.deleteVolume(volumeId);
  fs.rmSync(plainFile, { force: true });
}

// ---------------------------------------------------------------------------------------------------------------
// 2. The block end-to-end scenario, timed.

interface Streamed {
  statusMs: number;
  lastMessageMs: number;
  messages: number;
  blocks: Set<number>;
}

/** GetMetadataDelta as a backup client reads it: raw messages off the wire, decoded without message objects. */
function streamDelta(d: DataPlaneDriver, baseSnapshotId: string, targetSnapshotId: string): Promise<Streamed> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let last = t0;
    let messages = 0;
    const blocks = new Set<number>();
    const call = d.metadata.streamRaw(
      'getMetadataDelta',
      { baseSnapshotId, targetSnapshotId },
      { deadlineMs: 120_000 },
    );
    call.on('data', (raw: Buffer) => {
      last = performance.now();
      messages++;
      const { tuples } = decodeMetadataResponse(raw);
      for (let i = 0; i < tuples.length; i += 2) {
        const offset = tuples[i]!;
        const size = tuples[i + 1]!;
        for (let b = offset / BLOCK; b < (offset + size) / BLOCK; b++) blocks.add(b);
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve({ statusMs: msSince(t0), lastMessageMs: last - t0, messages, blocks }));
  });
}

async function blockE2e(ctx: SuiteContext, d: DataPlaneDriver, sizes: Sizes): Promise<void> {
  const capacity = sizeLabel(sizes.e2eCapacity);
  const volumeId = await d.createBlockVolume('block-e2e', sizes.e2eCapacity);
  const published = await d.stageAndPublish(volumeId, 'block-e2e');
  const common = { capacity, blockSize: BLOCK, device: published.device, quick: ctx.quick };
  ctx.emit({
    metric: 'node_stage_block_ms',
    value: round(published.stageMs),
    unit: 'ms',
    params: {
      ...common,
      rpc: 'NodeStageVolume',
      driver: process.env.CBT_BENCH_COMPILED === '1' ? 'compiled' : 'tsx',
      note: "the driver's first stage: it mounts the FUSE file system and starts the I/O threads",
    },
  });
  ctx.emit({
    metric: 'node_publish_block_ms',
    value: round(published.publishMs),
    unit: 'ms',
    params: { ...common, rpc: 'NodePublishVolume' },
  });

  const writePhase = async (phase: number): Promise<{ blocks: Set<number>; job: FioJob }> => {
    const iolog = path.join(d.dir, `phase-${phase}.iolog`);
    const job: FioJob = {
      filename: published.target,
      rw: 'randwrite',
      bs: BLOCK,
      size: sizes.e2eCapacity,
      ioSize: sizes.blocksPerPhase * BLOCK,
      endFsync: true,
      randseed: SEED + phase,
      writeIolog: iolog,
    };
    const t0 = performance.now();
    await fio(job);
    // fio's own record of what it submitted, independent of anything the driver reports.
    const blocks = blocksFromIolog(iolog);
    ctx.log(`phase ${phase}: ${blocks.size} distinct blocks written and fsynced in ${msSince(t0).toFixed(0)} ms`);
    if (blocks.size === 0) throw new Error(`phase ${phase}: fio's iolog lists no writes`);
    return { blocks, job };
  };

  const phase1 = await writePhase(1);
  const snap1 = await d.createSnapshot(volumeId, 'block-e2e-1');
  const phase2 = await writePhase(2);
  const snap2 = await d.createSnapshot(volumeId, 'block-e2e-2');

  for (const [i, snap, phase] of [
    [1, snap1, phase1],
    [2, snap2, phase2],
  ] as const) {
    ctx.emit(
      targeted(
        {
          metric: 'block_e2e_create_snapshot_rpc_ms',
          value: round(snap.ms),
          unit: 'ms',
          params: {
            ...common,
            snapshot: i,
            blocksWrittenBefore: phase.blocks.size,
            writes: 'fio randwrite 4KiB, libaio, O_DIRECT, iodepth 32, end_fsync, through the published device',
            timed: 'CreateSnapshot RPC round trip, grpc-js client, unix socket, volume staged and published',
          },
        },
        '< 100 ms',
        snap.ms < 100,
      ),
    );
  }

  const expected = phase2.blocks;
  const first = await streamDelta(d, snap1.snapshotId, snap2.snapshotId);
  const missing = [...expected].filter((b) => !first.blocks.has(b)).length;
  const extra = [...first.blocks].filter((b) => !expected.has(b)).length;
  const verified = missing === 0 && extra === 0;
  const statusSamples: number[] = [];
  const lastMessageSamples: number[] = [];
  for (let r = 0; r < sizes.deltaReps; r++) {
    const s = await streamDelta(d, snap1.snapshotId, snap2.snapshotId);
    statusSamples.push(s.statusMs);
    lastMessageSamples.push(s.lastMessageMs);
  }
  const ms = median(statusSamples);
  ctx.emit(
    targeted(
      {
        metric: 'block_e2e_get_metadata_delta_ms',
        value: round(ms),
        unit: 'ms',
        params: {
          ...common,
          style: 'VARIABLE',
          changedBlocks: expected.size,
          deltaBlocks: first.blocks.size,
          messages: first.messages,
          verified,
          missing,
          extra,
          expectedFrom: "fio's write_iolog of phase 2",
          timed: 'call to status (end of stream), grpc-js client, raw messages decoded',
          stat: `median of ${sizes.deltaReps} after one untimed call`,
          firstCallMs: round(first.statusMs),
          minMs: round(Math.min(...statusSamples)),
          maxMs: round(Math.max(...statusSamples)),
          medianToLastMessageMs: round(median(lastMessageSamples)),
        },
      },
      '< 100 ms',
      ms < 100,
    ),
  );

  await d.release(published);
  if (!verified) {
    throw new Error(
      `the delta is not the set of blocks written between the snapshots: ${missing} missing, ${extra} extra`,
    );
  }
}

// ---------------------------------------------------------------------------------------------------------------

const CASES: ReadonlyArray<readonly [string, (ctx: SuiteContext, d: DataPlaneDriver, sizes: Sizes) => Promise<void>]> =
  [
    ['throughput', throughput],
    ['block-e2e', blockE2e],
  ];

export async function run(ctx: SuiteContext): Promise<void> {
  const missing = missingPrerequisite();
  if (missing !== undefined) {
    ctx.log(`cannot run: ${missing}`);
    throw new Error(`the dataplane suite cannot run here: ${missing}`);
  }
  const selected = CASES.filter(([name]) => ctx.only === undefined || ctx.only.has(name));
  if (selected.length === 0) {
    ctx.log(`no case selected; cases are: ${CASES.map(([n]) => n).join(', ')}`);
    return;
  }
  const sizes = ctx.quick ? QUICK : FULL;
  const driver = await DataPlaneDriver.start(ctx.dir, ctx.log);
  // A signal ends the process from the runner's handler: undo mounts and devices before it removes the dir.
  const onExit = (): void => driver.emergencyCleanup();
  process.prependListener('exit', onExit);
  const failures: string[] = [];
  try {
    for (const [name, fn] of selected) {
      ctx.log(`case ${name}`);
      const t0 = performance.now();
      try {
        await fn(ctx, driver, sizes);
        ctx.log(`case ${name} done in ${(msSince(t0) / 1000).toFixed(1)} s`);
      } catch (err) {
        failures.push(name);
        ctx.log(`case ${name} FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
      }
    }
  } finally {
    try {
      await driver.teardown(ctx.log);
    } finally {
      process.off('exit', onExit);
    }
  }
  if (failures.length > 0) throw new Error(`dataplane cases failed: ${failures.join(', ')}`);
}
