/**
 * One process owns a store directory at a time: two processes appending to the same catalog and layer
 * files would corrupt both (invariant 6). Ownership is a kernel lock, flock(2) LOCK_EX on `store.lock`,
 * held on an open file description for as long as the store is open. The kernel drops it when that
 * description closes, also when the owner is killed, so a dead owner never blocks a restart, and no PID
 * is compared (PIDs lie across PID namespaces: two containers sharing a hostPath are both PID 1).
 *
 * Node has no flock binding and the engine takes no native addon. A flock lock belongs to the open file
 * description, not the process, so util-linux `flock -n -x 3` run with our descriptor as its fd 3 takes
 * the lock on our description; the helper exits and the lock stays ours until we close the descriptor.
 * Node opens files close-on-exec, so no later child (mount, losetup) inherits the lock.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BusyError } from './errors.js';

/** The file whose flock(2) lock is the ownership of the store. */
export const LOCK_FILE = 'store.lock';
/** The PID file of earlier versions: a PID proves nothing, so it is removed and never read. */
const LEGACY_OWNER_FILE = 'owner.pid';
/** The descriptor number our lock file gets in the flock helper. */
const HELPER_FD = 3;
/** flock's exit status when another description holds the lock (-E), apart from its usage errors. */
const CONFLICT_EXIT = 75;

/** Takes ownership of `dir` (BusyError if another open store holds it); returns the function that gives it up. */
export function takeOwnership(dir: string): () => void {
  const file = path.join(dir, LOCK_FILE);
  // O_NOFOLLOW: a symlink planted at the lock file's name must not make us lock (or create) something else.
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o600);
  try {
    fs.fchmodSync(fd, 0o600);
    lockExclusive(fd, dir, file);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
  noteOwner(fd);
  fs.rmSync(path.join(dir, LEGACY_OWNER_FILE), { force: true });
  let released = false;
  return () => {
    if (released) return;
    released = true;
    // Closing our only descriptor of the file is what releases the lock.
    fs.closeSync(fd);
  };
}

function lockExclusive(fd: number, dir: string, file: string): void {
  const stdio: (number | 'ignore' | 'pipe')[] = ['ignore', 'ignore', 'pipe'];
  stdio[HELPER_FD] = fd;
  const result = spawnSync(
    'flock',
    ['--nonblock', '--exclusive', '--conflict-exit-code', String(CONFLICT_EXIT), String(HELPER_FD)],
    {
      stdio,
      timeout: 30_000,
    },
  );
  if (result.error) {
    throw new Error(
      `cannot lock the store at ${dir}: running flock(1) from util-linux failed: ${result.error.message}`,
    );
  }
  if (result.status === CONFLICT_EXIT) {
    throw new BusyError(
      `the store at ${dir} is in use by another process (it holds the lock on ${file})${ownerNote(fd)}`,
    );
  }
  if (result.status !== 0) {
    const why = result.stderr?.toString().trim() || `exit status ${String(result.status ?? result.signal)}`;
    throw new Error(`cannot lock the store at ${dir}: flock(1) failed: ${why}`);
  }
}

/** Writes our PID into the lock file, for people reading a BusyError; the lock, not this, decides ownership. */
function noteOwner(fd: number): void {
  try {
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
  } catch {
    // A full disk may refuse even these bytes; the note is only informative.
  }
}

/** What the current owner wrote about itself, as a suffix of a BusyError message. */
function ownerNote(fd: number): string {
  try {
    const buffer = Buffer.alloc(32);
    const n = fs.readSync(fd, buffer, 0, buffer.length, 0);
    const pid = Number(buffer.subarray(0, n).toString().trim());
    return Number.isSafeInteger(pid) && pid > 0 ? `; its PID, as seen in its own PID namespace, is ${pid}` : '';
  } catch {
    return '';
  }
}
