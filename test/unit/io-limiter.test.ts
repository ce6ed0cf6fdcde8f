/**
 * The node's I/O limiter (src/dataplane/io-limiter.ts): token buckets with reservations. Time is a fake
 * clock here, so every number below is exact; test/e2e/io-limits.test.ts measures the real thing with fio.
 */
import { describe, expect, test } from 'vitest';
import {
  BURST_SECONDS,
  IoLimiter,
  type IoLimits,
  TokenBucket,
  fuseIoAdmission,
  ioLimitsOf,
} from '../../src/dataplane/io-limiter.js';
import { IN_HEADER_SIZE, Opcode, type InHeader } from '../../src/dataplane/fuse/protocol.js';

describe('TokenBucket', () => {
  test('starts with its burst, then each take beyond it waits exactly its debt at the rate', () => {
    const bucket = new TokenBucket(100, 10, 0);
    for (let i = 0; i < 10; i++) expect(bucket.take(1, 0)).toBe(0);
    // The 11th op is 1 token short: 1/100 s. The 12th is 2 short (reservations queue up).
    expect(bucket.take(1, 0)).toBeCloseTo(10);
    expect(bucket.take(1, 0)).toBeCloseTo(20);
  });

  test('over any long run, the ops let through add up to the rate (plus the burst), whatever the queue depth', () => {
    const bucket = new TokenBucket(500, 50, 0);
    // 10 s of requests arriving far faster than allowed: each is served at now + its wait.
    let served = 0;
    for (let i = 0; i < 20_000; i++) {
      const at = i * 0.05; // an arrival every 50 µs
      if (at + bucket.take(1, at) <= 10_000 + 1e-6) served++;
    }
    expect(served).toBe(500 * 10 + 50);
  });

  test('a request larger than the burst still passes, after its whole cost is paid', () => {
    const bucket = new TokenBucket(64 * 1024, 6553.6, 0);
    expect(bucket.take(1024 * 1024, 0)).toBeCloseTo(((1024 * 1024 - 6553.6) / (64 * 1024)) * 1000);
  });

  test('idle time refills up to the burst only', () => {
    const bucket = new TokenBucket(100, 10, 0);
    bucket.take(10, 0);
    // 60 s idle: still only 10 tokens.
    for (let i = 0; i < 10; i++) expect(bucket.take(1, 60_000)).toBe(0);
    expect(bucket.take(1, 60_000)).toBeGreaterThan(0);
  });

  test('setRate: the new rate applies from then on; tokens above the new burst are dropped', () => {
    const bucket = new TokenBucket(100, 10, 0);
    bucket.setRate(1000, 100, 0);
    // Still only the 10 tokens it had, then 1 ms per op at the new rate.
    for (let i = 0; i < 10; i++) expect(bucket.take(1, 0)).toBe(0);
    expect(bucket.take(1, 0)).toBeCloseTo(1);
    bucket.setRate(10, 1, 100);
    // 100 ms at 1000/s refilled 100 tokens (1 was owed), capped at the new burst of 1.
    expect(bucket.take(1, 100)).toBe(0);
    expect(bucket.take(1, 100)).toBeCloseTo(100);
  });
});

describe('IoLimiter', () => {
  function limiterWith(limits: Map<string, IoLimits>) {
    let now = 0;
    const reads: string[] = [];
    const limiter = new IoLimiter(
      (id) => {
        reads.push(id);
        return limits.get(id);
      },
      () => now,
    );
    return { limiter, reads, advance: (ms: number) => (now += ms) };
  }

  test('an unlimited or unknown volume is never held, and its limits are read once', () => {
    const { limiter, reads } = limiterWith(new Map([['vol-a', { iops: 0, bytesPerSecond: 0 }]]));
    for (let i = 0; i < 1000; i++) {
      expect(limiter.admit('vol-a', 1 << 20)).toBeUndefined();
      expect(limiter.admit('vol-gone', 1 << 20)).toBeUndefined();
    }
    expect(reads).toEqual(['vol-a', 'vol-gone']);
  });

  test('maxIops and maxBandwidth both hold: the longer wait of the two wins', async () => {
    const { limiter } = limiterWith(new Map([['vol-a', { iops: 1000, bytesPerSecond: 1024 * 1024 }]]));
    // Burst: 1000 * BURST_SECONDS ops and 1 MiB * BURST_SECONDS. One request of the whole byte burst fits.
    const burstBytes = 1024 * 1024 * BURST_SECONDS;
    expect(limiter.admit('vol-a', burstBytes)).toBeUndefined();
    // The next 100 KiB owes all its bytes (~98 ms) though it fits in ops: it is held.
    const held = limiter.admit('vol-a', 100 * 1024);
    expect(held).toBeInstanceOf(Promise);
    // Held behind it, not beside it: the debt adds up.
    expect(limiter.admit('vol-a', 1)).toBeInstanceOf(Promise);
    await held;
  });

  test('refresh: a changed limit applies to the next request; limits are read again only for volumes seen', () => {
    const limits = new Map([['vol-a', { iops: 10, bytesPerSecond: 0 }]]);
    const { limiter, reads } = limiterWith(limits);
    for (let i = 0; i < 10 * BURST_SECONDS; i++) expect(limiter.admit('vol-a', 4096)).toBeUndefined();
    expect(limiter.admit('vol-a', 4096)).toBeInstanceOf(Promise);
    limits.set('vol-a', { iops: 0, bytesPerSecond: 0 });
    limiter.refresh('vol-a');
    expect(limiter.admit('vol-a', 4096)).toBeUndefined();
    expect(limiter.limitsOf('vol-a')).toEqual({ iops: 0, bytesPerSecond: 0 });
    limiter.refresh('vol-never-seen');
    expect(reads).toEqual(['vol-a', 'vol-a']);
  });

  test('raising a limit takes effect without waiting out the old rate for new requests', () => {
    const limits = new Map([['vol-a', { iops: 100, bytesPerSecond: 0 }]]);
    const { limiter, advance } = limiterWith(limits);
    const oldBurst = 100 * BURST_SECONDS;
    for (let i = 0; i < oldBurst; i++) limiter.admit('vol-a', 4096); // the burst used
    advance(60_000);
    // A minute idle refills the burst only.
    let immediate = 0;
    for (let i = 0; i < 2 * oldBurst; i++) if (limiter.admit('vol-a', 4096) === undefined) immediate++;
    expect(immediate).toBe(oldBurst);
    limits.set('vol-a', { iops: 10_000, bytesPerSecond: 0 });
    limiter.refresh('vol-a');
    // The debt of oldBurst ops is paid at the new rate in oldBurst / 10 ms; then the new burst fills.
    advance(oldBurst / 10 + 1000 * BURST_SECONDS);
    immediate = 0;
    for (let i = 0; i < 3 * 10_000 * BURST_SECONDS; i++) if (limiter.admit('vol-a', 4096) === undefined) immediate++;
    expect(immediate).toBeCloseTo(10_000 * BURST_SECONDS, 0);
  });
});

describe('ioLimitsOf', () => {
  test('reads maxIops and maxBandwidth attributes; absent, "0" or garbage is no limit', () => {
    expect(ioLimitsOf({ maxIops: '500', maxBandwidth: '8388608' })).toEqual({ iops: 500, bytesPerSecond: 8388608 });
    expect(ioLimitsOf({})).toEqual({ iops: 0, bytesPerSecond: 0 });
    expect(ioLimitsOf({ maxIops: '0', maxBandwidth: 'x' })).toEqual({ iops: 0, bytesPerSecond: 0 });
  });
});

describe('fuseIoAdmission', () => {
  const header = (opcode: number, nodeid: number): InHeader => ({
    len: IN_HEADER_SIZE + 40,
    opcode,
    unique: 1n,
    nodeid,
    uid: 0,
    gid: 0,
    pid: 0,
  });
  const body = (size: number) => {
    const b = Buffer.alloc(40);
    b.writeUInt32LE(size, 16);
    return b;
  };

  test('charges READ and WRITE by their size field to the node’s volume; passes everything else', () => {
    const charged: [string, number][] = [];
    const limiter = {
      admit: (id: string, bytes: number) => {
        charged.push([id, bytes]);
        return undefined;
      },
    } as unknown as IoLimiter;
    const admit = fuseIoAdmission(limiter, (nodeid) => (nodeid === 2 ? 'vol-a' : undefined));
    admit(header(Opcode.READ, 2), body(4096));
    admit(header(Opcode.WRITE, 2), body(131072));
    admit(header(Opcode.FSYNC, 2), body(0));
    admit(header(Opcode.GETATTR, 2), body(0));
    admit(header(Opcode.READ, 1), body(4096)); // the root: no volume
    admit(header(Opcode.READ, 2), Buffer.alloc(8)); // malformed: left for the handler to refuse
    expect(charged).toEqual([
      ['vol-a', 4096],
      ['vol-a', 131072],
    ]);
  });
});
