/**
 * Crash-safe file writes for the backup repository: a temp file in the same directory, written, fsync'd,
 * renamed over its final name, then the directory fsync'd, so after a crash the name holds either nothing
 * or the whole content. Files 0600, directories 0700, whatever the umask.
 */
import fs from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

export const FILE_MODE = 0o600;
export const DIR_MODE = 0o700;

/** Creates `dir` (and missing parents it creates) with mode 0700. */
export async function mkdirPrivate(dir: string): Promise<void> {
  const first = await fs.promises.mkdir(dir, { recursive: true, mode: DIR_MODE });
  if (first === undefined) return;
  // mkdir's mode is filtered by the umask; chmod every directory this call created.
  for (let d = dir; ; d = path.dirname(d)) {
    await fs.promises.chmod(d, DIR_MODE);
    if (d === first || path.dirname(d) === d) break;
  }
}

/** fsync of a directory: makes the names created or renamed in it durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** A temp name beside `target`, in `tmpDir` if given (same filesystem, so rename works). */
export function tempName(target: string, tmpDir = path.dirname(target)): string {
  return path.join(tmpDir, `.${path.basename(target)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
}

/** Writes `data` to a temp file with mode `mode` (0600), fsync'd; returns its path. The caller renames it. */
export async function writeSyncedTemp(temp: string, data: Uint8Array | string, mode = FILE_MODE): Promise<void> {
  const handle = await fs.promises.open(temp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, mode);
  try {
    await handle.writeFile(data);
    await handle.chmod(mode);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * The whole protocol for one file: temp, write, fsync, rename, directory fsync. The rename replaces
 * whatever is at `target`, a symlink too, and never writes through it.
 */
export async function writeFileDurably(
  target: string,
  data: Uint8Array | string,
  tmpDir?: string,
  mode = FILE_MODE,
): Promise<void> {
  const temp = tempName(target, tmpDir);
  try {
    await writeSyncedTemp(temp, data, mode);
    await fs.promises.rename(temp, target);
  } catch (err) {
    await fs.promises.rm(temp, { force: true });
    throw err;
  }
  await fsyncDir(path.dirname(target));
}

/** fsync of one file by path. */
export async function fsyncFile(file: string): Promise<void> {
  const handle = await fs.promises.open(file, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
