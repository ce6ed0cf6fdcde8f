/**
 * Filesystems on staged volumes and the mounts that expose them: probe, mkfs (once), mount, bind mount,
 * unmount, online grow and usage. Mount points are read from /proc/self/mountinfo, never by touching
 * the path (a dead filesystem would make stat hang or fail).
 */
import fs from 'node:fs';
import path from 'node:path';
import { CommandError, runCommand } from './command.js';
import { parseMountInfo, type MountInfoEntry } from './fuse/mount.js';

/** Filesystems the node plugin makes and grows; the first is the default. */
export const FILESYSTEMS = ['ext4', 'xfs'] as const;
export type FilesystemType = (typeof FILESYSTEMS)[number];

export function isFilesystemType(value: string): value is FilesystemType {
  return (FILESYSTEMS as readonly string[]).includes(value);
}

/** What blkid finds on a device. */
export interface DeviceSignature {
  /** Filesystem type (TYPE), e.g. "ext4", "xfs", "swap"; undefined if none. */
  type: string | undefined;
  /** Partition table type (PTTYPE), e.g. "gpt"; undefined if none. */
  partitionTable: string | undefined;
}

/** Probes the device itself (-p: no cache) for a filesystem or partition table signature. */
export async function probeDevice(device: string): Promise<DeviceSignature> {
  try {
    const { stdout } = await runCommand('blkid', ['-p', '-o', 'export', device]);
    const fields = new Map<string, string>();
    for (const line of stdout.split('\n')) {
      const eq = line.indexOf('=');
      if (eq > 0) fields.set(line.slice(0, eq), line.slice(eq + 1));
    }
    return { type: fields.get('TYPE'), partitionTable: fields.get('PTTYPE') };
  } catch (err) {
    // Exit status 2: the probe found nothing, which is what a blank volume looks like.
    if (err instanceof CommandError && err.exitCode === 2) return { type: undefined, partitionTable: undefined };
    throw err;
  }
}

/**
 * Makes a filesystem. No discard pass: a new volume already reads as zeros, and a discard would reach the
 * block store as a trim of every block, so the first snapshot's delta would name the whole device even
 * though no content changed (and a backup would copy all of it). ext4's inode tables are still zeroed
 * lazily after mount by the kernel, which loop turns into zero-range requests: trims again, but only of
 * the inode table blocks.
 */
export async function makeFilesystem(device: string, type: FilesystemType): Promise<void> {
  const timeoutMs = 10 * 60_000;
  if (type === 'ext4') await runCommand('mkfs.ext4', ['-F', '-q', '-E', 'nodiscard', device], { timeoutMs });
  else await runCommand('mkfs.xfs', ['-f', '-q', '-K', device], { timeoutMs });
}

/** Mount options as one -o argument; each flag must be a plain option word. */
function optionString(flags: readonly string[]): string | undefined {
  for (const f of flags) {
    if (!f || /[\s\0]/.test(f)) throw new RangeError(`invalid mount flag ${JSON.stringify(f.slice(0, 64))}`);
  }
  return flags.length > 0 ? flags.join(',') : undefined;
}

/** Mounts a filesystem device at `target` (an existing directory). */
export async function mountFilesystem(
  device: string,
  target: string,
  type: FilesystemType,
  flags: readonly string[],
  readOnly: boolean,
): Promise<void> {
  const all = [...flags];
  // A volume restored from a snapshot carries its source's xfs UUID, and xfs refuses a second mount of
  // a UUID it already has mounted; the copies are distinct filesystems, so the check does not apply.
  if (type === 'xfs' && !all.includes('nouuid')) all.push('nouuid');
  if (readOnly) all.push('ro');
  const options = optionString(all);
  await runCommand('mount', ['-t', type, ...(options ? ['-o', options] : []), device, target]);
}

/**
 * Bind-mounts `source` (a directory or a device node) at `target` (an existing directory or file),
 * read-only if asked: a bind mount takes its own flags only on a remount.
 */
export async function bindMount(source: string, target: string, readOnly: boolean): Promise<void> {
  await runCommand('mount', ['--bind', source, target]);
  if (readOnly) {
    try {
      await runCommand('mount', ['-o', 'remount,bind,ro', target]);
    } catch (err) {
      await runCommand('umount', [target]).catch(() => undefined);
      throw err;
    }
  }
}

/**
 * Unmounts whatever is mounted at `target`, stacked mounts included. `lazy` detaches the mounts at once
 * and lets the kernel finish when their last user goes (for a filesystem whose device is dead).
 */
export async function unmountAll(target: string, options: { lazy?: boolean } = {}): Promise<void> {
  for (let i = 0; i < 16 && (await isMountPoint(target)); i++) {
    await runCommand('umount', options.lazy ? ['-l', target] : [target]);
  }
}

/** Grows a mounted filesystem to fill its device. ext4 grows through the device, xfs through the mount point. */
export async function growFilesystem(device: string, mountPoint: string, type: FilesystemType): Promise<void> {
  const timeoutMs = 10 * 60_000;
  if (type === 'ext4') await runCommand('resize2fs', [device], { timeoutMs });
  else await runCommand('xfs_growfs', [mountPoint], { timeoutMs });
}

/**
 * Grows an unmounted ext4 filesystem: e2fsck -f first (resize2fs insists on a freshly checked
 * filesystem), then resize2fs. For hosts where online growth is refused (no CAP_SYS_RESOURCE).
 */
export async function growExt4Offline(device: string): Promise<void> {
  const timeoutMs = 10 * 60_000;
  try {
    await runCommand('e2fsck', ['-f', '-p', device], { timeoutMs });
  } catch (err) {
    // Exit status 1: errors were found and corrected, which leaves a filesystem resize2fs accepts.
    if (!(err instanceof CommandError && err.exitCode === 1)) throw err;
  }
  await runCommand('resize2fs', [device], { timeoutMs });
}

/** Whether an online grow failed because the kernel refused the resize ioctl (EPERM), not the filesystem. */
export function isResizeRefused(err: unknown): boolean {
  return err instanceof CommandError && err.command === 'resize2fs' && /Permission denied to resize/i.test(err.stderr);
}

/** Space and inode counts of a mounted filesystem. */
export interface FilesystemUsage {
  totalBytes: number;
  availableBytes: number;
  usedBytes: number;
  totalInodes: number;
  availableInodes: number;
  usedInodes: number;
}

export async function filesystemUsage(mountPoint: string): Promise<FilesystemUsage> {
  const s = await fs.promises.statfs(mountPoint);
  return {
    totalBytes: s.blocks * s.bsize,
    availableBytes: s.bavail * s.bsize,
    usedBytes: (s.blocks - s.bfree) * s.bsize,
    totalInodes: s.files,
    availableInodes: s.ffree,
    usedInodes: s.files - s.ffree,
  };
}

/** The mount table of this process's mount namespace. */
export async function mountTable(): Promise<MountInfoEntry[]> {
  return parseMountInfo(await fs.promises.readFile('/proc/self/mountinfo', 'utf8'));
}

/** Mounts whose mount point is `target` (normalised, not resolved through symlinks), innermost last. */
export async function mountsAt(target: string): Promise<MountInfoEntry[]> {
  const normal = path.resolve(target);
  return (await mountTable()).filter((m) => m.mountPoint === normal);
}

export async function isMountPoint(target: string): Promise<boolean> {
  return (await mountsAt(target)).length > 0;
}
