/**
 * The paths a CO hands the node plugin (staging_target_path, target_path), checked before anything is put
 * there, and taken down afterwards only as far as the driver built them. Rules:
 * - the last component is never a symbolic link (it is refused, not followed);
 * - the parent must exist (the CO makes it) and is resolved with realpath: the resolved place may not be
 *   inside the driver's state directory, nor contain it;
 * - a block volume goes onto an absent path (the driver creates an empty file) or an existing empty
 *   regular file; a filesystem onto an absent path (the driver creates the directory) or an empty
 *   directory; anything else is refused;
 * - what the driver created is recorded, and at the end only that is removed, and only while it is still
 *   empty: an empty file it made, or a directory it made that nothing was left in.
 * Mount operations then use the resolved path, so the mount table names the same place later.
 */
import fs from 'node:fs';
import path from 'node:path';
import { NodeError, isNoSpace } from './node-errors.js';

/**
 * Filesystems that are kernel interfaces, by statfs magic number (linux/magic.h): nothing is put there.
 * Writing into them changes the kernel (a directory made in cgroupfs is a cgroup, in configfs or tracefs
 * a kernel object), and none of them is a place a CO means for a volume.
 */
const KERNEL_FILESYSTEMS: ReadonlyMap<number, string> = new Map([
  [0x9fa0, 'proc'],
  [0x62656572, 'sysfs'],
  [0x1cd1, 'devpts'],
  [0x27e0eb, 'cgroup'],
  [0x63677270, 'cgroup2'],
  [0x73636673, 'securityfs'],
  [0x64626720, 'debugfs'],
  [0x74726163, 'tracefs'],
  [0x62656570, 'configfs'],
  [0xcafe4a11, 'bpf'],
  [0x6165676c, 'pstore'],
  [0xde5e81e4, 'efivarfs'],
  [0x65735543, 'fusectl'],
  [0x42494e4d, 'binfmt_misc'],
  [0xf97cff8c, 'selinuxfs'],
  [0x43415d53, 'smackfs'],
  [0x6e736673, 'nsfs'],
  [0x19800202, 'mqueue'],
]);

/** What the driver created at a path: removed again at the end. 'nothing': the path was the CO's. */
export type Created = 'file' | 'directory' | 'nothing';

/** What goes at a path: a device file (block publish) or a directory (a mount). */
export type PathUse = 'file' | 'directory';

/** The outcome of removing what the driver created, for the log. */
export type RemoveOutcome = { removed: boolean; left?: string };

export class NodePaths {
  constructor(private readonly stateDir: string) {}

  /**
   * The place `requested` names, with its parent resolved through symlinks. Refuses a symlink at the path
   * itself, a missing parent, and any place inside the state directory (or containing it).
   */
  async resolve(requested: string, field: string): Promise<string> {
    const st = await lstatOrUndefined(requested);
    if (st?.isSymbolicLink()) {
      throw new NodeError(
        'failed-precondition',
        `${field} ${requested} is a symbolic link: the driver does not follow links at the paths it is given`,
      );
    }
    let parent: string;
    try {
      parent = await fs.promises.realpath(path.dirname(requested));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') {
        throw new NodeError(
          'failed-precondition',
          `the parent directory of ${field} ${requested} does not exist (the CO creates it)`,
        );
      }
      throw err;
    }
    const kernelFs = KERNEL_FILESYSTEMS.get((await fs.promises.statfs(parent)).type);
    if (kernelFs !== undefined) {
      throw new NodeError(
        'invalid-argument',
        `${field} ${requested} is on ${kernelFs}, a kernel interface filesystem (a directory made there can be a kernel object): volumes go on ordinary filesystems`,
      );
    }
    const real = path.join(parent, path.basename(requested));
    const state = await this.realStateDir();
    if (real === state || real.startsWith(`${state}/`)) {
      throw new NodeError(
        'invalid-argument',
        `${field} ${requested} is inside the driver's state directory ${this.stateDir}`,
      );
    }
    if (state.startsWith(real === '/' ? '/' : `${real}/`)) {
      throw new NodeError(
        'invalid-argument',
        `${field} ${requested} contains the driver's state directory ${this.stateDir}`,
      );
    }
    return real;
  }

  /**
   * Before taking down what is at `real` (a place `resolve` gave earlier): its parent must still resolve
   * to itself. A parent swapped for a symlink since would make unmount and removal act on another place,
   * which is not the driver's; that is refused, and the caller keeps its record. A parent that is gone
   * is fine: nothing of the driver's can be at the path then.
   */
  async checkStillResolves(real: string, requested: string, field: string): Promise<void> {
    const parent = path.dirname(real);
    let now: string;
    try {
      now = await fs.promises.realpath(parent);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return;
      throw err;
    }
    if (now !== parent) {
      throw new NodeError(
        'failed-precondition',
        `the parent directory of ${field} ${requested} was ${parent} and now leads to ${now}: the driver does not follow it to take the volume down; restore it and retry`,
      );
    }
  }

  private async realStateDir(): Promise<string> {
    try {
      return await fs.promises.realpath(this.stateDir);
    } catch {
      return path.resolve(this.stateDir);
    }
  }

  /**
   * Whether `real` can take a `use`: 'absent' (the driver will create it) or 'usable' (an empty file, an
   * empty directory). Anything else is FAILED_PRECONDITION naming `requested`.
   */
  async inspect(real: string, requested: string, field: string, use: PathUse): Promise<'absent' | 'usable'> {
    const st = await lstatOrUndefined(real);
    if (!st) return 'absent';
    if (use === 'file' && st.isFile() && st.size === 0) return 'usable';
    if (use === 'directory' && st.isDirectory() && (await isEmptyDir(real))) return 'usable';
    const what = await describe(real, st);
    const wanted =
      use === 'file'
        ? 'a block volume is published as a device file at an absent path or on an existing empty file'
        : 'a filesystem is mounted at an absent path or on an existing empty directory';
    throw new NodeError(
      'failed-precondition',
      `${field} ${requested} exists and is ${what}: ${wanted}; the driver does not cover or replace it`,
    );
  }

  /** Creates what `use` needs at an absent `real` (never replacing anything that appeared meanwhile). */
  async create(real: string, requested: string, field: string, use: PathUse): Promise<void> {
    try {
      if (use === 'directory') await fs.promises.mkdir(real, { mode: 0o750 });
      else await (await fs.promises.open(real, 'wx', 0o600)).close();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST') {
        throw new NodeError(
          'failed-precondition',
          `${field} ${requested} appeared while the driver was preparing it; it is left alone`,
        );
      }
      // No space is RESOURCE_EXHAUSTED (the Node service maps it); anything else is the path's fault.
      if (isNoSpace(err) || code === undefined) throw err;
      throw new NodeError('failed-precondition', `${field} ${requested} cannot be created: ${code}`);
    }
  }

  /**
   * Removes what the driver created at `real`, if it is still what it made: an empty regular file, or a
   * directory with nothing left in it. Never throws for what it leaves; it says why.
   */
  async removeCreated(real: string, created: Created): Promise<RemoveOutcome> {
    if (created === 'nothing') return { removed: false };
    const st = await lstatOrUndefined(real);
    if (!st) return { removed: false };
    if (created === 'file') {
      if (!st.isFile() || st.size !== 0)
        return { removed: false, left: `it is now ${await describe(real, st)}, not the empty file the driver made` };
      await fs.promises.unlink(real).catch(ignore('ENOENT'));
      return { removed: true };
    }
    if (!st.isDirectory())
      return { removed: false, left: `it is now ${await describe(real, st)}, not the directory the driver made` };
    try {
      await fs.promises.rmdir(real);
      return { removed: true };
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return { removed: false };
      if (code === 'ENOTEMPTY' || code === 'EEXIST')
        return { removed: false, left: 'files are left in it after the unmount' };
      if (code === 'EBUSY') return { removed: false, left: 'something is still mounted on it' };
      throw err;
    }
  }
}

async function lstatOrUndefined(p: string): Promise<fs.Stats | undefined> {
  try {
    return await fs.promises.lstat(p);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
    throw err;
  }
}

async function isEmptyDir(dir: string): Promise<boolean> {
  const handle = await fs.promises.opendir(dir);
  try {
    return (await handle.read()) === null;
  } finally {
    await handle.close().catch(() => undefined);
  }
}

/** What is at a path, in words for a status message. */
async function describe(p: string, st: fs.Stats): Promise<string> {
  if (st.isSymbolicLink()) return 'a symbolic link';
  if (st.isFile()) return st.size === 0 ? 'an empty file' : `a regular file of ${st.size} bytes`;
  if (st.isDirectory())
    return (await isEmptyDir(p).catch(() => false)) ? 'an empty directory' : 'a directory that is not empty';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  return 'something of another type';
}

function ignore(code: string): (err: NodeJS.ErrnoException) => void {
  return (err) => {
    if (err.code !== code) throw err;
  };
}
