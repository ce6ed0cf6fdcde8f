/**
 * Per-volume I/O limits on the node data plane: `maxIops` (READ and WRITE requests a second) and
 * `maxBandwidth` (bytes a second), enforced on the FUSE request path, so they hold for every reader and
 * writer of the volume's loop device, whatever the pod does. The limits are volume attributes in the
 * block store (set by CreateVolume and ControllerModifyVolume); the limiter reads them when a volume is
 * first seen and again on each `volume-attributes-changed` event, so a new limit applies to a volume that
 * is already published (docs/adr/0007-io-limits-from-store-attributes.md says why it works this way).
 *
 * Each limit is a token bucket whose requests reserve their tokens when they arrive and may go into debt:
 * a request that finds the bucket short waits until its debt is paid. Reservations keep arrival order and
 * make the long-run rate exactly the limit whatever the queue depth or the request sizes (a 1 MiB request
 * under a 64 KiB/s limit still passes, 16 s later), and late timers do not lower it (the bucket refills
 * meanwhile, up to its burst).
 */
import type { Attributes } from '../../storage-engine/index.js';
import { type InHeader, Opcode } from './fuse/protocol.js';

/** Attribute keys of the limits, stored with the volume; values are whole numbers, "0" or absent for none. */
export const ATTR_MAX_IOPS = 'maxIops';
export const ATTR_MAX_BANDWIDTH = 'maxBandwidth';

/**
 * How much unused budget a bucket keeps: half a second's worth. A pod's pauses shorter than that are not
 * lost, and neither are the driver's own: a stall of this process (GC, a busy or overloaded node) delays
 * requests, and the budget saved meanwhile lets them catch up, so the rate over a longer run stays the
 * limit. Measured on a loaded 2-core machine: with 100 ms, stalls cost up to a quarter of the rate; with
 * 1 s, a 4 s window could see a whole second's burst on top (+25%).
 */
export const BURST_SECONDS = 0.5;

/** A volume's limits; 0 means unlimited. */
export interface IoLimits {
  iops: number;
  bytesPerSecond: number;
}

export const NO_LIMITS: IoLimits = { iops: 0, bytesPerSecond: 0 };

/** The limits stored with a volume. Values that are not whole non-negative numbers count as no limit. */
export function ioLimitsOf(attributes: Attributes): IoLimits {
  const number = (key: string): number => {
    const value = Number(attributes[key] ?? '0');
    return Number.isSafeInteger(value) && value > 0 ? value : 0;
  };
  return { iops: number(ATTR_MAX_IOPS), bytesPerSecond: number(ATTR_MAX_BANDWIDTH) };
}

function unlimited(limits: IoLimits): boolean {
  return limits.iops === 0 && limits.bytesPerSecond === 0;
}

/** Tokens accrue at `rate` a second up to `burst`; taking more than there are leaves a debt to wait out. */
export class TokenBucket {
  private tokens: number;
  private at: number;

  constructor(
    private rate: number,
    private burst: number,
    nowMs: number,
  ) {
    // A new bucket starts full: a volume that was idle has its burst.
    this.tokens = burst;
    this.at = nowMs;
  }

  /** Takes `cost` tokens now; returns the milliseconds until they are paid for (0: at once). */
  take(cost: number, nowMs: number): number {
    this.refill(nowMs);
    this.tokens -= cost;
    return this.tokens >= 0 ? 0 : (-this.tokens / this.rate) * 1000;
  }

  /** A new rate from now on; tokens accrued so far were accrued at the old one. */
  setRate(rate: number, burst: number, nowMs: number): void {
    this.refill(nowMs);
    this.rate = rate;
    this.burst = burst;
    this.tokens = Math.min(this.tokens, burst);
  }

  private refill(nowMs: number): void {
    const elapsed = Math.max(0, nowMs - this.at);
    this.at = nowMs;
    this.tokens = Math.min(this.burst, this.tokens + (elapsed / 1000) * this.rate);
  }
}

/** One volume's buckets; undefined where that dimension is unlimited. */
interface VolumeBuckets {
  limits: IoLimits;
  ops: TokenBucket | undefined;
  bytes: TokenBucket | undefined;
}

/** The burst of a limit: BURST_SECONDS of it, and at least one request (one op, or 1 byte for bandwidth). */
function burstOf(rate: number): number {
  return Math.max(1, rate * BURST_SECONDS);
}

function bucketFor(rate: number, existing: TokenBucket | undefined, nowMs: number): TokenBucket | undefined {
  if (rate === 0) return undefined;
  if (!existing) return new TokenBucket(rate, burstOf(rate), nowMs);
  existing.setRate(rate, burstOf(rate), nowMs);
  return existing;
}

/** Where the limiter reads a volume's limits (the block store's attributes); undefined for an unknown volume. */
export type LimitsSource = (volumeId: string) => IoLimits | undefined;

export class IoLimiter {
  /** Volumes seen so far; an entry with no buckets is an unlimited volume (one map lookup a request). */
  private readonly volumes = new Map<string, VolumeBuckets>();

  constructor(
    private readonly source: LimitsSource,
    private readonly now: () => number = () => performance.now(),
  ) {}

  /**
   * Charges one request of `bytes` to the volume. Returns undefined when it may go at once (always, for
   * an unlimited volume), else a promise that resolves when it may.
   */
  admit(volumeId: string, bytes: number): Promise<void> | undefined {
    const buckets = this.volumes.get(volumeId) ?? this.load(volumeId);
    if (!buckets.ops && !buckets.bytes) return undefined;
    const now = this.now();
    const waitMs = Math.max(buckets.ops?.take(1, now) ?? 0, buckets.bytes?.take(bytes, now) ?? 0);
    if (waitMs <= 0) return undefined;
    return new Promise((resolve) => setTimeout(resolve, waitMs));
  }

  /** The limits in force for a volume (after reading them if it was not seen yet). */
  limitsOf(volumeId: string): IoLimits {
    return (this.volumes.get(volumeId) ?? this.load(volumeId)).limits;
  }

  /** Reads the volume's limits again (its attributes changed); budgets already used stay used. */
  refresh(volumeId: string): void {
    const current = this.volumes.get(volumeId);
    if (!current) return; // not seen yet: read on first use
    const limits = this.source(volumeId) ?? NO_LIMITS;
    const now = this.now();
    this.volumes.set(volumeId, {
      limits,
      ops: bucketFor(limits.iops, current.ops, now),
      bytes: bucketFor(limits.bytesPerSecond, current.bytes, now),
    });
  }

  /** Drops what is kept for a volume (it is no longer exposed). */
  forget(volumeId: string): void {
    this.volumes.delete(volumeId);
  }

  private load(volumeId: string): VolumeBuckets {
    const limits = this.source(volumeId) ?? NO_LIMITS;
    const now = this.now();
    const buckets: VolumeBuckets = unlimited(limits)
      ? { limits, ops: undefined, bytes: undefined }
      : {
          limits,
          ops: bucketFor(limits.iops, undefined, now),
          bytes: bucketFor(limits.bytesPerSecond, undefined, now),
        };
    this.volumes.set(volumeId, buckets);
    return buckets;
  }
}

/**
 * The FUSE dispatcher's admission hook: READ and WRITE requests are charged to the volume of their node
 * (the size field, at the same offset in both), every other request passes.
 */
export function fuseIoAdmission(
  limiter: IoLimiter,
  volumeOfNode: (nodeid: number) => string | undefined,
): (header: InHeader, body: Buffer) => Promise<void> | undefined {
  return (header, body) => {
    if ((header.opcode !== Opcode.READ && header.opcode !== Opcode.WRITE) || body.length < 20) return undefined;
    const volumeId = volumeOfNode(header.nodeid);
    return volumeId === undefined ? undefined : limiter.admit(volumeId, body.readUInt32LE(16));
  };
}
