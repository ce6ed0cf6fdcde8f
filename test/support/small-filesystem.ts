/**
 * A small real filesystem for tests of limits the state filesystem sets (largest file, free space): an
 * image file made with mkfs and loop-mounted on a temp directory. Needs root, loop devices and mkfs;
 * `smallFileSystemSuite` skips with the reason when one is missing, and fails instead under CI=true.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'vitest';

export interface SmallFileSystem {
  /** The mount point. */
  dir: string;
  /** Free bytes as `df` shows them (Available). */
  freeBytes(): number;
  /** Unmounts (which detaches the loop device) and removes the image. */
  remove(): void;
}

/** Why a loop-mounted filesystem cannot be made here, or undefined if it can. */
export function missingSmallFileSystem(mkfs = 'mkfs.ext4'): string | undefined {
  if (process.platform !== 'linux') return 'loop mounts need Linux';
  if (process.getuid?.() !== 0) return 'loop mounts need root';
  if (!fs.existsSync('/dev/loop-control')) return 'loop devices are missing (/dev/loop-control)';
  for (const tool of [mkfs, 'mount', 'umount']) {
    const found = (process.env.PATH ?? '').split(':').some((d) => d && fs.existsSync(path.join(d, tool)));
    if (!found) return `${tool} is not on PATH`;
  }
  return undefined;
}

/** describe() when a small filesystem can be made; else skipped with the reason, or a failing test under CI=true. */
export function smallFileSystemSuite(name: string, body: () => void, mkfs = 'mkfs.ext4'): void {
  const missing = missingSmallFileSystem(mkfs);
  if (!missing) describe(name, body);
  else if (process.env.CI === 'true') {
    describe(name, () =>
      it(`can make a loop-mounted filesystem (CI=true): ${missing}`, () => {
        throw new Error(missing);
      }),
    );
  } else describe.skip(`${name} — skipped: ${missing}`, body);
}

/**
 * Makes an ext4 image of `sizeBytes` with `blockSize`-byte filesystem blocks and mounts it. No blocks are
 * reserved for root (`-m 0`), so full means full for the root-run driver too.
 */
export function mountSmallExt4(options: { sizeBytes: number; blockSize?: 1024 | 2048 | 4096 }): SmallFileSystem {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-smallfs-'));
  const image = path.join(base, 'fs.img');
  const dir = path.join(base, 'mnt');
  fs.mkdirSync(dir);
  fs.closeSync(fs.openSync(image, 'w'));
  fs.truncateSync(image, options.sizeBytes);
  try {
    execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', '-b', String(options.blockSize ?? 4096), image], {
      stdio: 'pipe',
    });
    execFileSync('mount', ['-o', 'loop', image, dir], { stdio: 'pipe' });
  } catch (err) {
    fs.rmSync(base, { recursive: true, force: true });
    throw err;
  }
  let removed = false;
  return {
    dir,
    freeBytes() {
      const s = fs.statfsSync(dir);
      return s.bavail * s.bsize;
    },
    remove() {
      if (removed) return;
      removed = true;
      try {
        execFileSync('umount', [dir], { stdio: 'pipe' });
      } catch {
        // Still busy (a store that failed to close keeps files open): detach it now, freed when released.
        execFileSync('umount', ['--lazy', dir], { stdio: 'pipe' });
      }
      fs.rmSync(base, { recursive: true, force: true });
    },
  };
}

/**
 * The largest file `dir`'s filesystem accepts, asked of the kernel directly (ftruncate of a scratch file,
 * bisected up to 2^52 bytes): what tests compute expected volume limits from, independently of the engine.
 */
export function largestFileBytes(dir: string): number {
  const file = path.join(dir, `largest-file-check-${process.pid}`);
  const fd = fs.openSync(file, 'w', 0o600);
  const fits = (bytes: number): boolean => {
    try {
      fs.ftruncateSync(fd, bytes);
      return true;
    } catch {
      return false;
    }
  };
  try {
    let low = 0;
    let high = 2 ** 52 + 1;
    while (high - low > 1) {
      const mid = low + Math.floor((high - low) / 2);
      if (fits(mid)) low = mid;
      else high = mid;
    }
    return low;
  } finally {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}
