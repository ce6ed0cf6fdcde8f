/**
 * Fault injection: the rules in force, which call each applies to, and a connect interceptor that
 * carries the fault out (fail before or between messages, delay, stall, deadline). With no rules it
 * passes every call through untouched; rules exist only when configured (serve --faults, admin endpoint).
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { Code, type Interceptor, type StreamResponse } from '@connectrpc/connect';
import type { Logger } from '../logging.js';
import type { DriverMetrics } from '../metrics.js';
import { codeFromName, rpcError } from '../rpc/status.js';
import { FAULT_RPCS, type FaultRpc, type FaultRule } from './fault-rules.js';

/** A rule in force, numbered, with what it has done so far. */
export interface ActiveFault extends FaultRule {
  id: number;
  /** Matching calls it has taken (at most `times`). */
  matched: number;
  /** Calls it actually broke (a fail-after on a shorter stream matches but does not fire). */
  fired: number;
}

/** What a call is about, for matching rules. */
interface CallSubject {
  rpc: FaultRpc;
  snapshots: string[];
  volume: string | undefined;
}

const DEFAULT_CODE = 'UNAVAILABLE';
const DEADLINE = Symbol('deadline');
const CANCELLED = Symbol('cancelled');
/** CSI 1.12: changed block tracking cannot answer; the client should take a full backup. */
const FAILED_PRECONDITION_MESSAGE =
  'changed block tracking is not available for this snapshot: take a full backup (injected fault)';

export class FaultInjector {
  private rules: ActiveFault[] = [];
  private nextId = 1;
  /** One seeded random sequence per flaky rule, so a run is reproducible. */
  private readonly randoms = new Map<number, () => number>();

  constructor(
    private readonly deps: {
      logger: Logger;
      metrics: DriverMetrics;
      volumeOfSnapshot: (snapshotId: string) => string | undefined;
    },
    initial: readonly FaultRule[] = [],
  ) {
    this.add(initial);
  }

  add(rules: readonly FaultRule[]): ActiveFault[] {
    const added = rules.map((r) => ({ ...r, id: this.nextId++, matched: 0, fired: 0 }));
    for (const rule of added) {
      if (rule.action === 'flaky') this.randoms.set(rule.id, mulberry32(rule.seed ?? 1));
      this.deps.logger.info({ fault: rule.id, rpc: rule.rpc, action: rule.action }, 'fault rule added');
    }
    this.rules.push(...added);
    return added;
  }

  list(): ActiveFault[] {
    return this.rules.map((r) => ({ ...r }));
  }

  /** Removes one rule (by id) or all; returns how many went. */
  clear(id?: number): number {
    const before = this.rules.length;
    this.rules = id === undefined ? [] : this.rules.filter((r) => r.id !== id);
    for (const key of [...this.randoms.keys()]) if (!this.rules.some((r) => r.id === key)) this.randoms.delete(key);
    return before - this.rules.length;
  }

  /** The first rule with uses left that matches the call; taking it uses one. */
  private take(subject: CallSubject): ActiveFault | undefined {
    const rule = this.rules.find(
      (r) =>
        r.rpc === subject.rpc &&
        (r.times === undefined || r.matched < r.times) &&
        (r.snapshot === undefined || subject.snapshots.includes(r.snapshot)) &&
        (r.volume === undefined || r.volume === subject.volume),
    );
    if (rule) rule.matched++;
    return rule;
  }

  private fired(rule: ActiveFault, detail: Record<string, unknown>): void {
    rule.fired++;
    this.deps.metrics.faultsFired.inc({ rpc: rule.rpc, action: rule.action });
    this.deps.logger.warn({ fault: rule.id, rpc: rule.rpc, action: rule.action, ...detail }, 'fault fired');
  }

  /** The interceptor; put it inside the logging one so injected failures are logged and counted as RPCs. */
  interceptor(): Interceptor {
    return (next) => async (req) => {
      if (this.rules.length === 0 || !(FAULT_RPCS as readonly string[]).includes(req.method.name)) return next(req);
      let input: unknown;
      if (req.stream) {
        // A server-streaming call's one request message arrives as a stream: read it, then hand it on.
        for await (const message of req.message) {
          input = message;
          break;
        }
        const single = input;
        req = {
          ...req,
          message: (async function* () {
            if (single !== undefined) yield single;
          })(),
        } as typeof req;
      } else {
        input = req.message;
      }
      const rule = this.take(this.subject(req.method.name as FaultRpc, (input ?? {}) as Record<string, unknown>));
      if (!rule) return next(req);
      const signal = req.signal;
      const started = Date.now();
      switch (rule.action) {
        case 'fail':
          this.fired(rule, { at: 'before the first message' });
          throw injected(rule, rule.code ?? DEFAULT_CODE, `injected fault ${rule.id}: ${rule.rpc} failed`);
        case 'failed-precondition':
          this.fired(rule, { at: 'before the first message' });
          throw injected(rule, 'FAILED_PRECONDITION', FAILED_PRECONDITION_MESSAGE);
        case 'flaky': {
          const draw = this.randoms.get(rule.id)!();
          if (draw >= rule.probability!) return next(req);
          this.fired(rule, { at: 'before the first message', draw });
          throw injected(
            rule,
            rule.code ?? DEFAULT_CODE,
            `injected fault ${rule.id}: ${rule.rpc} failed (flaky, p=${rule.probability})`,
          );
        }
        default:
          break;
      }
      if (!req.stream) {
        // Unary calls take only delay (the rules parser refuses the stream-only actions for them).
        this.fired(rule, { delayMs: rule.delayMs });
        await sleep(rule.delayMs ?? 0, undefined, { signal });
        return next(req);
      }
      const res = await next(req);
      if (!res.stream) return res;
      return { ...res, message: this.broken(rule, res.message, signal, started) } as StreamResponse;
    };
  }

  /** The stream with the rule's between-message fault applied. */
  private async *broken<T>(
    rule: ActiveFault,
    messages: AsyncIterable<T>,
    signal: AbortSignal,
    started: number,
  ): AsyncGenerator<T> {
    const it = messages[Symbol.asyncIterator]();
    // deadline: every wait below races the one timer, as a sidecar's stream context would cut any of them.
    const timer = new AbortController();
    const deadline =
      rule.action === 'deadline'
        ? sleep(Math.max(0, started + rule.deadlineMs! - Date.now()), DEADLINE, { signal: timer.signal }).catch(
            () => CANCELLED,
          )
        : undefined;
    const wait = async <V>(work: Promise<V>): Promise<V> => {
      if (!deadline) return work;
      const result = await Promise.race([work, deadline]);
      if (result === DEADLINE) {
        this.fired(rule, { afterMessages: sent, deadlineMs: rule.deadlineMs });
        throw injected(
          rule,
          'DEADLINE_EXCEEDED',
          `context deadline exceeded (injected fault ${rule.id}: stream deadline of ${rule.deadlineMs} ms)`,
        );
      }
      return result as V;
    };
    let sent = 0;
    try {
      for (;;) {
        if (rule.action === 'fail-after' && sent === rule.afterMessages) {
          // Fires only if the stream has more to send: a stream of N or fewer messages ends cleanly.
          const peek = await it.next();
          if (peek.done) return;
          this.fired(rule, { afterMessages: sent });
          throw injected(
            rule,
            rule.code ?? DEFAULT_CODE,
            `injected fault ${rule.id}: stream cut after ${sent} messages`,
          );
        }
        if (rule.action === 'stall' && sent === (rule.afterMessages ?? 0)) {
          this.fired(rule, { afterMessages: sent, stallMs: rule.stallMs });
          await sleep(rule.stallMs!, undefined, { signal });
        }
        const next = await wait(it.next());
        if (next.done) return;
        if (rule.delayMs !== undefined) {
          if (sent === 0 && rule.action === 'delay') this.fired(rule, { delayMs: rule.delayMs });
          await wait(sleep(rule.delayMs, undefined, { signal }));
        }
        yield next.value;
        sent++;
      }
    } finally {
      timer.abort();
      await it.return?.();
    }
  }

  private subject(rpc: FaultRpc, message: Record<string, unknown>): CallSubject {
    const str = (k: string) =>
      typeof message[k] === 'string' && message[k] !== '' ? (message[k] as string) : undefined;
    if (rpc === 'CreateSnapshot') {
      const name = str('name');
      return { rpc, snapshots: name ? [name] : [], volume: str('sourceVolumeId') };
    }
    const snapshots = ['snapshotId', 'baseSnapshotId', 'targetSnapshotId']
      .map(str)
      .filter((s): s is string => s !== undefined);
    // A delta is about the target's volume; the other calls name one snapshot.
    const about = str('targetSnapshotId') ?? str('snapshotId');
    const needVolume = this.rules.some((r) => r.volume !== undefined);
    return { rpc, snapshots, volume: needVolume && about ? this.deps.volumeOfSnapshot(about) : undefined };
  }
}

function injected(rule: ActiveFault, codeName: string, fallback: string) {
  const code = codeFromName(codeName);
  return rpcError(code === undefined || code === 0 ? Code.Unavailable : code, rule.message ?? fallback);
}

/** A small seeded PRNG (mulberry32): the same seed gives the same sequence on every run and platform. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
