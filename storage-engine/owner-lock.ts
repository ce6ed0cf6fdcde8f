/**
 * One process owns a store directory at a time: two processes appending to the same catalog and layer
 * files would corrupt both. Node has no flock, so ownership is a file naming the owner's PID, created
 * exclusively; a file naming a dead process is stale (its owner was killed) and is taken over.
 */
import fs from 'node:fs';
import path from 'node:path';
import { BusyError } from './errors.js';

const OWNER_FILE = 'owner.pid';

/** Takes ownership of `dir`; returns the function that gives it up. */
export function takeOwnership(dir: string): () => void {
  const file = path.join(dir, OWNER_FILE);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      fs.writeFileSync(file, `${process.pid}\n`, { flag: 'wx', mode: 0o600 });
      return () => {
        try {
          if (ownerOf(file) === process.pid) fs.rmSync(file, { force: true });
        } catch {
          // Already gone: nothing to give up.
        }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const owner = ownerOf(file);
    // Our own PID is a store this process opened before (reopen after close, or a PID namespace restart).
    if (owner !== undefined && owner !== process.pid && isAlive(owner)) {
      throw new BusyError(`the store at ${dir} is in use by process ${owner}`);
    }
    fs.rmSync(file, { force: true });
  }
  throw new BusyError(`could not take ownership of the store at ${dir}: another process keeps claiming it`);
}

/** The PID named in the owner file, or undefined if it is missing or unreadable. */
export function ownerOf(file: string): number | undefined {
  try {
    const pid = Number(fs.readFileSync(file, 'utf8').trim());
    return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists but belongs to someone else, which still means alive.
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
