/**
 * SHA-256 of chunk buffers on worker threads. A full backup hashes every byte it reads (~0.8 CPU-s per GiB
 * with SHA-NI on the dev VM); on the main thread that was two thirds of its busy time, and while it hashed, no
 * read completion, chunk write or fsync was handled. Buffers in shared memory (allocAligned) are hashed where
 * they lie, so a hash costs one small message each way; any other buffer is hashed inline, as before.
 */
import { createHash } from 'node:crypto';
import os from 'node:os';
import { Worker } from 'node:worker_threads';

/**
 * Threads a backup, restore or check hashes on: one a core, up to four (each hashes ~1.4 GB/s with SHA-NI,
 * so four outrun any source read here).
 */
export const HASH_THREADS = Math.min(4, os.availableParallelism());

/** The whole thread: hash the range it is sent, answer with the hex digest or the error. */
const THREAD = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
parentPort.on('message', ({ id, memory, offset, length }) => {
  try {
    parentPort.postMessage({ id, hash: createHash('sha256').update(new Uint8Array(memory, offset, length)).digest('hex') });
  } catch (err) {
    parentPort.postMessage({ id, error: String((err && err.message) || err) });
  }
});
`;

interface Answer {
  id: number;
  hash?: string;
  error?: string;
}

/** The hex SHA-256 of `data`, on this thread. */
export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

export class Sha256Threads {
  private readonly workers: Worker[] = [];
  /** Hashes asked of each worker and not yet answered: the next goes to the least busy. */
  private readonly busy: number[] = [];
  private readonly waiting = new Map<number, { resolve: (hash: string) => void; reject: (err: Error) => void }>();
  private nextId = 0;
  private failure: Error | undefined;

  constructor(count: number) {
    for (let i = 0; i < count; i++) {
      const worker = new Worker(THREAD, { eval: true, name: `sha256-${i}` });
      worker.on('message', (a: Answer) => this.answered(i, a));
      worker.on('error', (err) => this.fail(err));
      worker.on('exit', (code) => {
        if (code !== 0) this.fail(new Error(`a SHA-256 thread exited with code ${code}`));
      });
      this.workers.push(worker);
      this.busy.push(0);
    }
  }

  /** The hex SHA-256 of `data`: on a thread when it lies in shared memory, else here. */
  hash(data: Buffer): Promise<string> {
    if (this.workers.length === 0 || !(data.buffer instanceof SharedArrayBuffer)) return Promise.resolve(sha256(data));
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    let thread = 0;
    for (let i = 1; i < this.busy.length; i++) if (this.busy[i]! < this.busy[thread]!) thread = i;
    this.busy[thread]!++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.workers[thread]!.postMessage({ id, memory: data.buffer, offset: data.byteOffset, length: data.length });
    });
  }

  private answered(thread: number, a: Answer): void {
    this.busy[thread]!--;
    const w = this.waiting.get(a.id);
    if (!w) return;
    this.waiting.delete(a.id);
    if (a.hash !== undefined) w.resolve(a.hash);
    else w.reject(new Error(`SHA-256 thread: ${a.error}`));
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.rejectWaiting(err);
  }

  private rejectWaiting(err: Error): void {
    for (const w of this.waiting.values()) w.reject(err);
    this.waiting.clear();
  }

  /** Stops the threads; hashes still asked of them fail (a caller that stopped early no longer waits for them). */
  async close(): Promise<void> {
    this.rejectWaiting(new Error('the SHA-256 threads were closed'));
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
  }
}
