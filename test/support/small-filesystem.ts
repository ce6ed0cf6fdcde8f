/**
 * A small real filesystem for full-disk tests: an ext4 image of a few MiB, loop-mounted in a temp dir
 * (so filling it is quick), unmounted and removed afterwards. Needs root, loop devices, mkfs.ext4 and mount.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** Why a small filesystem cannot be mounted here, or undefined if it can. */
export function missingSmallFilesystem(): string | undefined {
  if (process.platform !== 'linux') return 'mounting a filesystem image needs Linux';
  if (process.getuid?.() !== 0) return 'mounting a filesystem image needs root';
  if (!fs.existsSync('/dev/loop-control')) return 'loop devices are missing (/dev/loop-control)';
  for (const tool of ['mkfs.ext4', 'mount', 'umount']) {
    const found = (process.env['PATH'] ?? '').split(':').some((d) => d && fs.existsSync(path.join(d, tool)));
    if (!found) return `${tool} is not on PATH (e2fsprogs, util-linux)`;
  }
  return undefined;
}

export interface SmallFilesystem {
  /** Where it is mounted. */
  mountPoint: string;
  /** Free bytes as `df` shows them (Available). */
  freeBytes(): number;
  /** Unmounts it and removes the image and the temp dir. */
  remove(): void;
}

/** Makes and mounts an ext4 filesystem of `sizeMiB` (no blocks reserved for root, so full means full). */
export function mountSmallExt4(sizeMiB: number): SmallFilesystem {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-small-fs-'));
  const image = path.join(dir, 'fs.img');
  const mountPoint = path.join(dir, 'mnt');
  fs.mkdirSync(mountPoint);
  fs.writeFileSync(image, '');
  fs.truncateSync(image, sizeMiB * 1024 * 1024);
  let mounted = false;
  try {
    execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', image], { stdio: 'pipe' });
    execFileSync('mount', ['-o', 'loop', image, mountPoint], { stdio: 'pipe' });
    mounted = true;
  } catch (err) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    mountPoint,
    freeBytes() {
      const s = fs.statfsSync(mountPoint);
      return s.bavail * s.bsize;
    },
    remove() {
      if (mounted) {
        try {
          execFileSync('umount', [mountPoint], { stdio: 'pipe' });
        } catch {
          // Still busy (a store that failed to close keeps files open): detach it now, free it when released.
          execFileSync('umount', ['--lazy', mountPoint], { stdio: 'pipe' });
        }
      }
      mounted = false;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
