/**
 * Making and removing the FUSE mount with util-linux mount(8)/umount(8), and finding mounts through
 * /proc/self/mountinfo. `mount -i` skips the mount.fuse helper: the mount syscall gets our already open
 * /dev/fuse fd (inherited by the child at the same number) and needs nothing from libfuse.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export interface MountInfoEntry {
  /** Kernel device number of the mounted file system, as "major:minor". */
  device: string;
  mountPoint: string;
  fsType: string;
  source: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo octal. */
function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Parses mountinfo text (see proc(5)): fields before " - " then fstype and source after it. */
export function parseMountInfo(text: string): MountInfoEntry[] {
  const out: MountInfoEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    const device = left[2];
    const mountPoint = left[4];
    const fsType = right[0];
    if (device === undefined || mountPoint === undefined || fsType === undefined) continue;
    out.push({
      device,
      mountPoint: unescapeMountField(mountPoint),
      fsType,
      source: unescapeMountField(right[1] ?? ''),
    });
  }
  return out;
}

/** FUSE mounts (any subtype) currently at `mountPoint`, innermost last. */
export function fuseMountsAt(mountPoint: string): MountInfoEntry[] {
  const target = path.resolve(mountPoint);
  return parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8')).filter(
    (m) => m.mountPoint === target && (m.fsType === 'fuse' || m.fsType.startsWith('fuse.')),
  );
}

/** Result of a finished child process. */
interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
}

function run(command: string, args: string[], extraFd?: number): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const stdio: Array<'ignore' | 'pipe' | number> = ['ignore', 'ignore', 'pipe'];
    if (extraFd !== undefined) stdio.push(extraFd);
    const child = spawn(command, args, { stdio });
    let stderr = '';
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stderr: stderr.trim() }));
  });
}

export class MountError extends Error {}

export interface FuseMountOptions {
  /** Source shown in mountinfo and `mount` output. */
  source: string;
  /** Let users other than the mounting one (root) use the mount; kubelet and pods need it. */
  allowOther: boolean;
  /** Let the kernel check permissions from the mode bits instead of asking the server (ACCESS). */
  defaultPermissions: boolean;
}

/**
 * Mounts the FUSE connection of `fd` on `mountPoint`. The child inherits `fd` as its fd 3, which is the
 * number the option names. Resolves when the mount syscall has returned; the kernel's INIT request is
 * then waiting on the device.
 */
export async function mountFuse(fd: number, mountPoint: string, options: FuseMountOptions): Promise<void> {
  const childFd = 3;
  const opts = [`fd=${childFd}`, 'rootmode=40000', 'user_id=0', 'group_id=0'];
  if (options.allowOther) opts.push('allow_other');
  if (options.defaultPermissions) opts.push('default_permissions');
  const r = await run('mount', ['-i', '-t', 'fuse', '-o', opts.join(','), options.source, mountPoint], fd);
  if (r.code !== 0) throw new MountError(`mount of ${mountPoint} failed (${r.code ?? r.signal}): ${r.stderr}`);
}

/** `umount`, or with `lazy` `umount -l` (detach now, finish when the last user lets go). */
export async function unmount(mountPoint: string, lazy: boolean): Promise<void> {
  const r = await run('umount', lazy ? ['-l', mountPoint] : [mountPoint]);
  if (r.code !== 0)
    throw new MountError(`umount${lazy ? ' -l' : ''} ${mountPoint} failed (${r.code ?? r.signal}): ${r.stderr}`);
}

/**
 * Removes FUSE mounts left at `mountPoint` by a server that died (its connection is gone and every access
 * fails with ENOTCONN). Lazy, because a loop device may still hold a file of the dead mount open.
 * Returns how many were removed.
 */
export async function cleanStaleFuseMounts(mountPoint: string): Promise<number> {
  let removed = 0;
  // Mounts can be stacked if earlier clean-ups failed; peel them one at a time, newest first.
  for (let left = fuseMountsAt(mountPoint).length; left > 0; left--) {
    await unmount(mountPoint, true);
    removed++;
  }
  return removed;
}

const FUSECTL_DIR = '/sys/fs/fuse/connections';

/** The name of a connection's fusectl directory: the kernel's internal dev_t (major << 20 | minor). */
export function fuseConnectionId(device: string): string {
  const [major, minor] = device.split(':').map((n) => Number.parseInt(n, 10));
  if (major === undefined || minor === undefined || Number.isNaN(major) || Number.isNaN(minor)) {
    throw new MountError(`malformed device number ${device}`);
  }
  return String(major * 2 ** 20 + minor);
}

/**
 * Aborts a FUSE connection through fusectl (mounting fusectl first if needed): every pending and future
 * request fails and a blocked read of the device returns ENODEV. The last resort when an unmount cannot
 * complete because something (a loop device) still holds a file.
 */
export async function abortFuseConnection(device: string): Promise<void> {
  const id = fuseConnectionId(device);
  const abortFile = path.join(FUSECTL_DIR, id, 'abort');
  if (!fs.existsSync(abortFile)) {
    const mounted = parseMountInfo(fs.readFileSync('/proc/self/mountinfo', 'utf8')).some((m) => m.fsType === 'fusectl');
    if (!mounted) {
      const r = await run('mount', ['-t', 'fusectl', 'fusectl', FUSECTL_DIR]);
      if (r.code !== 0) throw new MountError(`mounting fusectl failed: ${r.stderr}`);
    }
  }
  if (!fs.existsSync(abortFile)) return; // the connection is already gone
  fs.writeFileSync(abortFile, '1');
}
