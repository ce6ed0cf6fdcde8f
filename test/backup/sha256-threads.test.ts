/**
 * Chunk hashing off the main thread: a backup's chunk buffers (shared memory) are hashed on worker threads
 * where they lie, so the main thread keeps handling reads and writes meanwhile; any other buffer is hashed
 * inline. Either way the answer is the chunk's SHA-256, the name the repository stores it under.
 */
import { createHash, randomFillSync } from 'node:crypto';
import { afterEach, expect, it } from 'vitest';
import { allocAligned } from '../../src/backup/direct-io.js';
import { Sha256Threads } from '../../src/backup/sha256-threads.js';

const MiB = 1024 * 1024;
const hex = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

let threads: Sha256Threads | undefined;
afterEach(async () => {
  await threads?.close();
  threads = undefined;
});

it('chunk buffers are shared memory, so threads can read them where they lie', () => {
  const [buffer] = allocAligned(MiB, 1);
  expect(buffer!.buffer).toBeInstanceOf(SharedArrayBuffer);
});

it('hashes of many shared buffers asked at once each equal SHA-256 of that buffer, whatever its offset', async () => {
  threads = new Sha256Threads(2);
  const buffers = allocAligned(MiB, 6);
  for (const b of buffers) randomFillSync(b);
  // Whole buffers, and slices that start and end inside one (as a packed chunk's data does).
  const views = [...buffers, buffers[2]!.subarray(4096, 4096 + 12345), buffers[5]!.subarray(1, 2)];
  const hashes = await Promise.all(views.map((v) => threads!.hash(v)));
  expect(hashes).toEqual(views.map(hex));
});

it('the main thread runs while a large shared buffer is hashed', async () => {
  threads = new Sha256Threads(1);
  const [big] = allocAligned(256 * MiB, 1);
  big!.fill(7);
  let turns = 0;
  const ticker = setInterval(() => turns++, 1);
  try {
    // ~0.2 s of SHA-256 at 1.4 GB/s: inline, no timer could fire until it returned.
    expect(await threads.hash(big!)).toBe(hex(big!));
  } finally {
    clearInterval(ticker);
  }
  expect(turns).toBeGreaterThan(5);
});

it('a buffer outside shared memory is hashed inline, with the same answer', async () => {
  threads = new Sha256Threads(2);
  const plain = randomFillSync(Buffer.alloc(MiB + 7));
  expect(plain.buffer).not.toBeInstanceOf(SharedArrayBuffer);
  expect(await threads.hash(plain)).toBe(hex(plain));
});

it('after close, hashing still answers, inline', async () => {
  threads = new Sha256Threads(2);
  await threads.close();
  const [b] = allocAligned(MiB, 1);
  randomFillSync(b!);
  expect(await threads.hash(b!)).toBe(hex(b!));
});

it('closing fails the hashes still asked, so nothing waits for them forever', async () => {
  threads = new Sha256Threads(1);
  const [big] = allocAligned(256 * MiB, 1);
  const failed = expect(threads.hash(big!)).rejects.toThrow(/closed/);
  await threads.close();
  await failed;
});
