/**
 * The repository's writer lock: flock(2) LOCK_EX on REPO/lock, held on an open file description while a
 * backup writes. The kernel drops it when that description closes, also when the writer is killed, so a
 * dead writer never blocks the next one, and no PID is compared. (A PID file lied: a lock created but not
 * yet filled in read as stale, and two backup Jobs in their own PID namespaces are both PID 1, so each took
 * the other's lock for its own dead one; the second then removed the first's unnamed chunks as garbage.)
 *
 * Node has no flock binding: util-linux `flock -n -x 3`, run with our descriptor as its fd 3, takes the lock
 * on our open file description, as storage-engine/owner-lock.ts does for a store. The file stays; whether
 * it is locked, not whether it exists, says whether a backup is writing.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { FILE_MODE } from './durable-files.js';

/** The descriptor number our lock file gets in the flock helper. */
const HELPER_FD = 3;
/** flock's exit status when another description holds the lock (-E). */
const CONFLICT_EXIT = 75;

/**
 * Takes the exclusive lock on `file` (created 0600 if absent; a symlink there is refused). Returns the
 * function that gives it up, or undefined when another open description (another backup) holds it.
 */
export function lockExclusive(file: string): (() => void) | undefined {
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, FILE_MODE);
  try {
    fs.fchmodSync(fd, FILE_MODE);
    const stdio: (number | 'ignore' | 'pipe')[] = ['ignore', 'ignore', 'pipe'];
    stdio[HELPER_FD] = fd;
    const result = spawnSync(
      'flock',
      ['--nonblock', '--exclusive', '--conflict-exit-code', String(CONFLICT_EXIT), String(HELPER_FD)],
      { stdio, timeout: 30_000 },
    );
    if (result.error)
      throw new Error(`cannot lock ${file}: running flock(1) from util-linux failed: ${result.error.message}`);
    if (result.status === CONFLICT_EXIT) {
      fs.closeSync(fd);
      return undefined;
    }
    if (result.status !== 0) {
      const why = result.stderr?.toString().trim() || `exit status ${String(result.status ?? result.signal)}`;
      throw new Error(`cannot lock ${file}: flock(1) failed: ${why}`);
    }
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
  // For people looking: who holds it (as seen in its own PID namespace). The lock, not this, decides.
  try {
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
  } catch {
    // A full disk may refuse even these bytes; the note is only informative.
  }
  let released = false;
  return () => {
    if (released) return;
    released = true;
    // Closing our only descriptor of the file is what releases the lock.
    fs.closeSync(fd);
  };
}
