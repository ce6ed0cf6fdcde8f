/**
 * Modes of what the server creates outside the engine (the state directory, the CSI socket), whatever
 * the umask it was started with: volume data is behind them, and the socket takes every CSI call. The
 * engine sets the modes of its own files.
 */
import fs from 'node:fs';
import path from 'node:path';

/** Directories the driver creates: only root (the driver) may list or enter them. */
export const PRIVATE_DIRECTORY_MODE = 0o700;

/** The CSI socket: only its owner (root, as are the CSI sidecars and kubelet) may connect. */
export const SOCKET_MODE = 0o600;

/**
 * Creates `dir` and any missing parents as 0700 whatever the umask. Directories that already existed are
 * left as they are: they are not ours (a hostPath, /var/lib), and tightening them could break their owner.
 */
export function makePrivateDirectory(dir: string): void {
  const first = fs.mkdirSync(dir, { recursive: true, mode: PRIVATE_DIRECTORY_MODE });
  if (first === undefined) return;
  // mkdir's mode is masked by the umask (0o277 would leave 0500): set each directory made here exactly.
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    fs.chmodSync(d, PRIVATE_DIRECTORY_MODE);
    if (d === path.resolve(first) || d === path.dirname(d)) break;
  }
}

/**
 * Runs `bind`, which must create a unix socket synchronously (net.Server.listen on a path binds before it
 * returns), under a umask that makes the socket 0600 from its first moment; no other JavaScript runs
 * meanwhile. Callers still set SOCKET_MODE once listening, in case the umask could not be changed (a
 * worker thread cannot).
 */
export function withSocketUmask(bind: () => void): void {
  let previous: number | undefined;
  try {
    previous = process.umask(0o777 & ~SOCKET_MODE);
  } catch {
    // Worker threads cannot change the process umask.
  }
  try {
    bind();
  } finally {
    if (previous !== undefined) process.umask(previous);
  }
}
