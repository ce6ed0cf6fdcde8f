/**
 * Fault rules: which call a fault applies to and what happens to it. Rules come from YAML/JSON (a file
 * given to `serve --faults`, or the admin endpoint) and are validated strictly: a mistyped rule must be
 * refused with the field named, never silently do nothing on a vendor's test run.
 */
import { codeFromName } from '../rpc/status.js';

export const FAULT_RPCS = ['GetMetadataAllocated', 'GetMetadataDelta', 'CreateSnapshot', 'DeleteSnapshot'] as const;
export type FaultRpc = (typeof FAULT_RPCS)[number];
const STREAM_RPCS: readonly FaultRpc[] = ['GetMetadataAllocated', 'GetMetadataDelta'];

export const FAULT_ACTIONS = [
  'fail',
  'fail-after',
  'delay',
  'stall',
  'deadline',
  'failed-precondition',
  'flaky',
] as const;
export type FaultAction = (typeof FAULT_ACTIONS)[number];
/** Actions that act between messages, so only on the two streaming RPCs. */
const STREAM_ONLY: readonly FaultAction[] = ['fail-after', 'stall', 'deadline'];

/** A validated rule, as given (before the injector numbers it). */
export interface FaultRule {
  rpc: FaultRpc;
  /** Only calls about this volume (CreateSnapshot's source; the metadata calls' snapshot's volume). */
  volume?: string;
  /** Only calls about this snapshot (any of snapshot_id, base, target; CreateSnapshot: its name). */
  snapshot?: string;
  /** Only the first K matching calls; absent: every matching call. */
  times?: number;
  action: FaultAction;
  /** gRPC code name for fail, fail-after and flaky (default UNAVAILABLE). */
  code?: string;
  message?: string;
  /** fail-after: messages sent before failing. stall: messages sent before the stall (default 0). */
  afterMessages?: number;
  /** delay (and deadline, to pace the stream): wait before each message (before the reply of a unary call). */
  delayMs?: number;
  /** stall: one pause of this long, then the stream goes on. */
  stallMs?: number;
  /** deadline: the stream ends with DEADLINE_EXCEEDED this long after the call started. */
  deadlineMs?: number;
  /** flaky: chance in [0, 1] that a matching call fails before its first message. */
  probability?: number;
  /** flaky: seed of the reproducible random sequence (default 1). */
  seed?: number;
}

/** A rule that does not validate; the message names the field. */
export class FaultRuleError extends Error {
  override readonly name = 'FaultRuleError';
}

/** Which fields each action needs (required) and allows (optional), besides the common ones. */
const ACTION_FIELDS: Record<FaultAction, { required: (keyof FaultRule)[]; optional: (keyof FaultRule)[] }> = {
  fail: { required: [], optional: ['code', 'message'] },
  'fail-after': { required: ['afterMessages'], optional: ['code', 'message'] },
  delay: { required: ['delayMs'], optional: [] },
  stall: { required: ['stallMs'], optional: ['afterMessages'] },
  // delayMs paces the stream, so the deadline can fall mid-stream as it does behind a slow backend.
  deadline: { required: ['deadlineMs'], optional: ['message', 'delayMs'] },
  'failed-precondition': { required: [], optional: ['message'] },
  flaky: { required: ['probability'], optional: ['seed', 'code', 'message'] },
};
const COMMON_FIELDS: (keyof FaultRule)[] = ['rpc', 'volume', 'snapshot', 'times', 'action'];
const ALL_FIELDS = new Set<string>([
  ...COMMON_FIELDS,
  ...Object.values(ACTION_FIELDS).flatMap((f) => [...f.required, ...f.optional]),
]);

/** Validates one rule; `where` prefixes messages (e.g. "faults[2]"). */
export function parseFaultRule(value: unknown, where = 'rule'): FaultRule {
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new FaultRuleError(`${where}: must be a mapping of fields`);
  const raw = value as Record<string, unknown>;
  for (const key of Object.keys(raw)) {
    if (!ALL_FIELDS.has(key)) throw new FaultRuleError(`${where}.${key.slice(0, 64)}: unknown field`);
  }
  const rpc = oneOf(raw, 'rpc', FAULT_RPCS, where, true)!;
  const action = oneOf(raw, 'action', FAULT_ACTIONS, where, true)!;
  const fields = ACTION_FIELDS[action];
  for (const key of Object.keys(raw) as (keyof FaultRule)[]) {
    if (!COMMON_FIELDS.includes(key) && !fields.required.includes(key) && !fields.optional.includes(key)) {
      throw new FaultRuleError(`${where}.${key}: does not apply to action ${action}`);
    }
  }
  for (const key of fields.required) {
    if (raw[key] === undefined) throw new FaultRuleError(`${where}.${key}: required by action ${action}`);
  }
  if (STREAM_ONLY.includes(action) && !STREAM_RPCS.includes(rpc)) {
    throw new FaultRuleError(
      `${where}.action: ${action} applies only to the streaming RPCs (${STREAM_RPCS.join(', ')}), not ${rpc}`,
    );
  }
  const rule: FaultRule = { rpc, action };
  const volume = text(raw, 'volume', where);
  const snapshot = text(raw, 'snapshot', where);
  const message = text(raw, 'message', where);
  if (volume !== undefined) rule.volume = volume;
  if (snapshot !== undefined) rule.snapshot = snapshot;
  if (message !== undefined) rule.message = message;
  const times = integer(raw, 'times', where, 1);
  if (times !== undefined) rule.times = times;
  if (raw.code !== undefined) {
    const code = text(raw, 'code', where)!;
    const canonical = code.toUpperCase();
    if (codeFromName(canonical) === undefined || canonical === 'OK') {
      throw new FaultRuleError(
        `${where}.code: ${JSON.stringify(code.slice(0, 64))} is not a gRPC error code name such as UNAVAILABLE`,
      );
    }
    rule.code = canonical;
  }
  const afterMessages = integer(raw, 'afterMessages', where, action === 'fail-after' ? 1 : 0);
  if (afterMessages !== undefined) rule.afterMessages = afterMessages;
  for (const key of ['delayMs', 'stallMs', 'deadlineMs'] as const) {
    const ms = integer(raw, key, where, key === 'delayMs' ? 0 : 1);
    if (ms !== undefined) rule[key] = ms;
  }
  if (raw.probability !== undefined) {
    const p = raw.probability;
    if (typeof p !== 'number' || !(p >= 0 && p <= 1))
      throw new FaultRuleError(`${where}.probability: must be a number from 0 to 1`);
    rule.probability = p;
  }
  const seed = integer(raw, 'seed', where, 0);
  if (seed !== undefined) rule.seed = seed;
  return rule;
}

/** A rules document: a list of rules, or a mapping whose `faults` key holds the list. */
export function parseFaultRules(document: unknown): FaultRule[] {
  let list = document;
  if (document === null || document === undefined) return [];
  if (typeof document === 'object' && !Array.isArray(document)) {
    const keys = Object.keys(document);
    const extra = keys.find((k) => k !== 'faults');
    if (extra !== undefined)
      throw new FaultRuleError(`${extra.slice(0, 64)}: unknown key (expected a list of rules, or faults: [...])`);
    list = (document as { faults?: unknown }).faults ?? [];
  }
  if (!Array.isArray(list)) throw new FaultRuleError('faults: must be a list of rules');
  return list.map((r, i) => parseFaultRule(r, `faults[${i}]`));
}

function oneOf<T extends string>(
  raw: Record<string, unknown>,
  key: string,
  allowed: readonly T[],
  where: string,
  required: boolean,
): T | undefined {
  const v = raw[key];
  if (v === undefined) {
    if (required) throw new FaultRuleError(`${where}.${key}: required (one of ${allowed.join(', ')})`);
    return undefined;
  }
  if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) {
    throw new FaultRuleError(
      `${where}.${key}: ${JSON.stringify(String(v).slice(0, 64))} is not one of ${allowed.join(', ')}`,
    );
  }
  return v as T;
}

function text(raw: Record<string, unknown>, key: string, where: string): string | undefined {
  const v = raw[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || v === '') throw new FaultRuleError(`${where}.${key}: must be a non-empty string`);
  if (v.length > 1024) throw new FaultRuleError(`${where}.${key}: longer than 1024 characters`);
  return v;
}

function integer(raw: Record<string, unknown>, key: string, where: string, min: number): number | undefined {
  const v = raw[key];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min)
    throw new FaultRuleError(`${where}.${key}: must be an integer of at least ${min}`);
  return v;
}
