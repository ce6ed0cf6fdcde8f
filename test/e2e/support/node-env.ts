/**
 * A whole driver (`cbt-csi serve`, role all) running as a child process, with typed clients for every
 * service, for tests of the node data plane. The driver is a separate process on purpose: it answers the
 * kernel's FUSE requests on its main thread, and the test reads and writes through devices and mounts
 * it serves, with plain synchronous calls, as a pod would.
 *
 * Needs root, /dev/fuse, loop devices and the util-linux/e2fsprogs/xfsprogs tools; `dataPlaneSuite`
 * skips with the reason when one is missing, and fails instead under CI=true.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { beforeEach, describe, it } from 'vitest';
import { Controller, Identity, Node, SnapshotMetadata } from '../../../src/gen/csi/v1/csi_pb.js';
import { parseMountInfo } from '../../../src/dataplane/fuse/mount.js';
import { ServiceClient } from '../../support/csi-client.js';
import { spawnDriver } from '../../support/test-driver.js';

const TOOLS = ['mount', 'umount', 'losetup', 'blkid', 'mkfs.ext4', 'resize2fs', 'mkfs.xfs', 'xfs_growfs', 'dd'];

/** Why the data plane (and `extraTools`) cannot run here, or undefined if it can. */
export function missingDataPlane(extraTools: readonly string[] = []): string | undefined {
  if (process.platform !== 'linux') return 'the node data plane needs Linux';
  if (process.getuid?.() !== 0) return 'the node data plane needs root (mount, losetup)';
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing';
  if (!fs.existsSync('/dev/loop-control')) return 'loop devices are missing (/dev/loop-control)';
  for (const tool of [...TOOLS, ...extraTools]) {
    const found = (process.env.PATH ?? '').split(':').some((d) => d && fs.existsSync(path.join(d, tool)));
    if (!found) return `${tool} is not on PATH (util-linux, e2fsprogs, xfsprogs)`;
  }
  return undefined;
}

/**
 * describe() when the data plane (and `extraTools`) can run; else skipped with the reason, or a failing test
 * under CI=true.
 */
export function dataPlaneSuite(name: string, body: () => void, extraTools: readonly string[] = []): void {
  const missing = missingDataPlane(extraTools);
  if (!missing) {
    describe(name, () => {
      beforeEach(({ onTestFailed }) => onTestFailed(printDriverLogs));
      body();
    });
  } else if (process.env.CI === 'true') {
    describe(name, () =>
      it(`has what the node data plane needs (CI=true): ${missing}`, () => {
        throw new Error(missing);
      }),
    );
  } else describe.skip(`${name} — skipped: ${missing}`, body);
}

export interface NodeEnv {
  dir: string;
  stateDir: string;
  target: string;
  child: ChildProcess;
  identity: ServiceClient<typeof Identity>;
  controller: ServiceClient<typeof Controller>;
  node: ServiceClient<typeof Node>;
  metadata: ServiceClient<typeof SnapshotMetadata>;
  stderr(): string;
  /** The driver's log (JSON lines) since it was last started. */
  stdout(): string;
  /** A fresh directory under the test's temp dir. */
  path(...parts: string[]): string;
  /** SIGTERM (graceful) or SIGKILL; resolves when the process has exited. Clients are closed. */
  stopDriver(signal?: NodeJS.Signals): Promise<void>;
  /** Starts a new driver on the same state directory and socket. */
  restartDriver(): Promise<void>;
  /** Stops the driver, removes every mount and loop device left under the temp dir, removes it. */
  cleanup(): Promise<void>;
}

export interface NodeEnvOptions {
  /** The driver's state directory (e.g. on a small filesystem the test made); default <dir>/state. */
  stateDir?: string;
}

export async function startNodeEnv(extraArgs: string[] = [], options: NodeEnvOptions = {}): Promise<NodeEnv> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-node-'));
  const stateDir = options.stateDir ?? path.join(dir, 'state');
  const socket = path.join(dir, 'csi.sock');
  const args = [
    '--endpoint',
    `unix://${socket}`,
    '--state-dir',
    stateDir,
    '--node-id',
    'test-node',
    '--log-level',
    process.env.CBT_TEST_LOG ?? 'warn',
    ...extraArgs,
  ];
  const env: NodeEnv = {
    dir,
    stateDir,
    target: `unix://${socket}`,
    child: undefined as unknown as ChildProcess,
    identity: undefined as unknown as ServiceClient<typeof Identity>,
    controller: undefined as unknown as ServiceClient<typeof Controller>,
    node: undefined as unknown as ServiceClient<typeof Node>,
    metadata: undefined as unknown as ServiceClient<typeof SnapshotMetadata>,
    stderr: () => '',
    stdout: () => '',
    path: (...parts) => path.join(dir, ...parts),
    async stopDriver(signal = 'SIGTERM') {
      for (const c of [env.identity, env.controller, env.node, env.metadata]) c.close();
      const child = env.child;
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill(signal);
      await exited;
    },
    async restartDriver() {
      const started = await spawnDriver(args);
      env.child = started.child;
      env.stderr = started.stderr;
      env.stdout = started.stdout;
      env.identity = new ServiceClient(Identity, env.target);
      env.controller = new ServiceClient(Controller, env.target);
      env.node = new ServiceClient(Node, env.target);
      env.metadata = new ServiceClient(SnapshotMetadata, env.target);
    },
    async cleanup() {
      liveEnvs.delete(env);
      // Listed while the driver's mount still names them: afterwards their files have no path.
      const devices = loopDevicesUnder(stateDir).map((d) => d.name);
      cleanupUnder(dir, devices);
      await env.stopDriver('SIGTERM').catch(() => undefined);
      cleanupUnder(dir, devices);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  await env.restartDriver();
  liveEnvs.add(env);
  return env;
}

/** Node environments started and not yet cleaned up, whose drivers' logs a failed test prints. */
const liveEnvs = new Set<NodeEnv>();
const LOG_LINES_ON_FAILURE = 60;

/**
 * Prints the end of each live driver's log, so that a failure seen only in CI (an INTERNAL answer says
 * no more than "internal error") can be read from CI's output: the error line carries the cause's stack.
 */
function printDriverLogs(): void {
  for (const env of liveEnvs) {
    const lines = env.stdout().trimEnd().split('\n').slice(-LOG_LINES_ON_FAILURE).join('\n');
    const stderr = env.stderr().trimEnd().split('\n').slice(-10).join('\n');
    console.error(
      `--- driver log, last ${LOG_LINES_ON_FAILURE} lines (${env.dir}):\n${lines}\n--- driver stderr:\n${stderr}`,
    );
  }
}

/** Lazily unmounts everything mounted under `dir` (the volume-file mount last) and detaches `devices`. */
export function cleanupUnder(dir: string, devices: readonly string[]): void {
  const mounts = parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8'))
    .filter((m) => m.mountPoint === dir || m.mountPoint.startsWith(`${dir}/`))
    .filter((m) => !m.fsType.startsWith('fuse'))
    .reverse();
  for (const m of mounts) spawnSync('umount', ['-l', m.mountPoint]);
  for (const d of devices) spawnSync('losetup', ['-d', d]);
}

/** Whether something is mounted at `target` (from mountinfo, without touching the path). */
export function isMounted(target: string): boolean {
  return parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8')).some((m) => m.mountPoint === target);
}

/** The mount at `target`, innermost. */
export function mountAt(target: string) {
  return parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8'))
    .filter((m) => m.mountPoint === target)
    .at(-1);
}

/** Loop devices attached to files of the driver's FUSE mount under `stateDir`. */
export function loopDevicesUnder(stateDir: string): LoopDeviceInfo[] {
  return attachedLoopDevices().filter((d) => d.backFile.startsWith(`${path.join(stateDir, 'fuse')}/`));
}

export interface LoopDeviceInfo {
  name: string;
  backFile: string;
  dio: boolean;
  ro: boolean;
}

/** Every attached loop device, as losetup lists them. */
export function attachedLoopDevices(): LoopDeviceInfo[] {
  const list = spawnSync('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE,DIO,RO'], { encoding: 'utf8' });
  if (list.status !== 0 || !list.stdout.trim()) return [];
  const devices = (JSON.parse(list.stdout) as { loopdevices: Record<string, unknown>[] }).loopdevices;
  return devices.map((d) => ({
    name: String(d.name),
    backFile: String(d['back-file']),
    dio: d.dio === true,
    ro: d.ro === true,
  }));
}

/** Runs a tool synchronously (the driver is another process); throws with its stderr on failure. */
export function sh(command: string, args: string[]): string {
  const r = spawnSync(command, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${r.stderr || r.error?.message}`);
  return r.stdout;
}

/** Writes `data` at `offset` with O_DIRECT, then fsyncs (dd: Node cannot align its buffers for O_DIRECT). */
export function directWrite(device: string, offset: number, data: Buffer, scratch: string): void {
  if (offset % 512 !== 0 || data.length % 512 !== 0) throw new Error('direct I/O needs 512-byte alignment');
  fs.writeFileSync(scratch, data);
  sh('dd', [
    `if=${scratch}`,
    `of=${device}`,
    'bs=512',
    `seek=${offset / 512}`,
    `count=${data.length / 512}`,
    'oflag=direct',
    'conv=notrunc,fsync',
    'status=none',
  ]);
}

/** Reads a whole device (or `length` bytes) with O_DIRECT into memory. */
export function directRead(device: string, length: number, scratch: string): Buffer {
  sh('dd', [
    `if=${device}`,
    `of=${scratch}`,
    'bs=1M',
    `count=${Math.ceil(length / 2 ** 20)}`,
    'iflag=direct',
    'status=none',
  ]);
  return fs.readFileSync(scratch).subarray(0, length);
}

export const MiB = 2 ** 20;

export const mountCap = (fsType = '', mode = 1, mountFlags: string[] = []) => ({
  accessType: { case: 'mount' as const, value: { fsType, mountFlags } },
  accessMode: { mode },
});
export const blockCap = (mode = 1) => ({ accessType: { case: 'block' as const, value: {} }, accessMode: { mode } });
