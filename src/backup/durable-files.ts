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

/**
 * Creates `dir` and its missing parents, each with mode 0700 (an existing one is left as it is). Not
 * mkdir({recursive}): Node's walk spins forever at 100% CPU where a parent exists but cannot hold the child
 * (under /proc: ENOENT, then EEXIST for the parent, again and again). Here the missing directories are made
 * from the nearest existing one down, and an ENOENT is final.
 */
export async function mkdirPrivate(dir: string): Promise<void> {
  const missing: string[] = [];
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    const st = await fs.promises.stat(d).catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
    if (st) {
      if (!st.isDirectory())
        throw Object.assign(new Error(`ENOTDIR: ${d} is not a directory`), { code: 'ENOTDIR', path: d });
      break;
    }
    missing.push(d);
    if (path.dirname(d) === d) break;
  }
  for (const d of missing.reverse()) {
    try {
      await fs.promises.mkdir(d, { mode: DIR_MODE });
    } catch (err) {
      // Made meanwhile (another backup making the same repository): it is there, and not ours to chmod.
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') continue;
      throw err;
    }
    // mkdir's mode is filtered by the umask.
    await fs.promises.chmod(d, DIR_MODE);
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
