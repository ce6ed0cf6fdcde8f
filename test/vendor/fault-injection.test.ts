/**
 * Fault injection (vendor bench): each kind fires with its code, at its message count or time, only on
 * the calls it names, and the next call without a matching rule is clean. Rules are set over the admin
 * endpoint (as `cbt-csi faults add` does) and read with the independent grpc-js client.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { status } from '@grpc/grpc-js';
import { parse as parseYaml } from 'yaml';
import { REPO_ROOT, startTestDriver, type TestDriver } from '../support/test-driver.js';
import type { RpcError } from '../support/csi-client.js';
import { adminRequest } from '../../src/vendor/admin-endpoint.js';
import { FaultRuleError, parseFaultRule, parseFaultRules } from '../../src/vendor/fault-rules.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let t: TestDriver;
let admin: string;
let volumeId: string;
let base: string;
let target: string;
let otherVolume: string;
let otherSnap: string;

beforeAll(async () => {
  // The admin socket lives in its own directory; the driver's temp dir is made by startTestDriver.
  const dir = fs.mkdtempSync(path.join(fs.realpathSync('/tmp'), 'cbt-admin-'));
  admin = path.join(dir, 'admin.sock');
  t = await startTestDriver({ adminEndpoint: admin, metricsAddress: '127.0.0.1:0' });
  const store = t.driver.store;
  const vol = await store.createVolume({ capacityBytes: 64 * MiB });
  volumeId = vol.id;
  base = (await store.createSnapshot({ volumeId })).id;
  // 10 messages of 10 tuples: 100 separate blocks, max_results 10.
  for (let i = 0; i < 100; i++) store.write(volumeId, i * 8 * KiB, Buffer.alloc(4 * KiB, 7));
  target = (await store.createSnapshot({ volumeId })).id;
  otherVolume = (await store.createVolume({ capacityBytes: MiB })).id;
  store.write(otherVolume, 0, Buffer.alloc(4 * KiB, 1));
  otherSnap = (await store.createSnapshot({ volumeId: otherVolume })).id;
});
afterAll(async () => {
  await t?.stop();
  fs.rmSync(path.dirname(admin), { recursive: true, force: true });
});
afterEach(async () => {
  await adminRequest(admin, 'DELETE', '/faults');
});

async function addFault(rule: Record<string, unknown>): Promise<void> {
  await adminRequest(admin, 'POST', '/faults', rule);
}

/** Reads a delta stream, counting messages, and returns how it ended. */
async function readDelta(
  maxResults = 10,
): Promise<{ messages: number; code: number; details: string; ms: number; gaps: number[] }> {
  const started = Date.now();
  let last = started;
  const gaps: number[] = [];
  let messages = 0;
  try {
    for await (const _m of t.metadata.stream('getMetadataDelta', {
      baseSnapshotId: base,
      targetSnapshotId: target,
      maxResults,
    })) {
      messages++;
      gaps.push(Date.now() - last);
      last = Date.now();
    }
    return { messages, code: 0, details: '', ms: Date.now() - started, gaps };
  } catch (err) {
    const e = err as RpcError;
    return { messages, code: e.code, details: decodeURIComponent(e.details), ms: Date.now() - started, gaps };
  }
}

/** The driver's /metrics page, as Prometheus scrapes it. */
async function metricsText(): Promise<string> {
  return (await fetch(t.driver.metricsUrl!)).text();
}

describe('fault kinds', () => {
  test('no rules: the stream is untouched (10 messages, OK)', async () => {
    expect(await readDelta()).toMatchObject({ messages: 10, code: 0 });
  });

  test('fail: fails before the first message with the given code and message; the next call is clean', async () => {
    await addFault({
      rpc: 'GetMetadataDelta',
      action: 'fail',
      code: 'RESOURCE_EXHAUSTED',
      message: 'too busy',
      times: 1,
    });
    expect(await readDelta()).toMatchObject({ messages: 0, code: status.RESOURCE_EXHAUSTED, details: 'too busy' });
    expect(await readDelta()).toMatchObject({ messages: 10, code: 0 });
  });

  test('fail-after: UNAVAILABLE after exactly N messages; the next call is clean', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'fail-after', afterMessages: 3, times: 1 });
    const cut = await readDelta();
    expect(cut).toMatchObject({ messages: 3, code: status.UNAVAILABLE });
    expect(cut.details).toMatch(/stream cut after 3 messages/);
    expect(await readDelta()).toMatchObject({ messages: 10, code: 0 });
  });

  test('fail-after N on a stream of N or fewer messages does not fire', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'fail-after', afterMessages: 10 });
    expect(await readDelta()).toMatchObject({ messages: 10, code: 0 });
    const [rule] = ((await adminRequest(admin, 'GET', '/faults')) as { faults: { matched: number; fired: number }[] })
      .faults;
    expect(rule).toMatchObject({ matched: 1, fired: 0 });
  });

  test('delay: every message waits delayMs', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'delay', delayMs: 40, times: 1 });
    const slow = await readDelta();
    expect(slow).toMatchObject({ messages: 10, code: 0 });
    expect(slow.ms).toBeGreaterThanOrEqual(10 * 40 - 5);
    const fast = await readDelta();
    expect(fast.ms).toBeLessThan(200);
  });

  test('stall: after afterMessages messages one pause of stallMs, then the stream completes', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'stall', afterMessages: 2, stallMs: 400, times: 1 });
    const stalled = await readDelta();
    expect(stalled).toMatchObject({ messages: 10, code: 0 });
    // When each message arrived, from the start of the call: the third cannot come before the stall ends,
    // and the first two are not held back by it.
    const arrivals = stalled.gaps.map((_, i) => stalled.gaps.slice(0, i + 1).reduce((a, b) => a + b, 0));
    expect(arrivals[2]!).toBeGreaterThanOrEqual(390);
    expect(arrivals[1]!).toBeLessThan(390);
  });

  test('deadline: a slow stream ends with DEADLINE_EXCEEDED at the deadline, as the sidecar cuts it', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'deadline', deadlineMs: 1000, times: 1 });
    expect(await readDelta()).toMatchObject({ messages: 10, code: 0 }); // fast enough: the deadline never hits
    // Paced at 100 ms a message, a 450 ms deadline falls after the 4th message (fewer on a loaded machine,
    // where each message comes a little later; never more, and never before the deadline).
    await addFault({ rpc: 'GetMetadataDelta', action: 'deadline', deadlineMs: 450, delayMs: 100, times: 1 });
    const cut = await readDelta();
    expect(cut.code).toBe(status.DEADLINE_EXCEEDED);
    expect(cut.messages).toBeGreaterThanOrEqual(1);
    expect(cut.messages).toBeLessThanOrEqual(4);
    expect(cut.ms).toBeGreaterThanOrEqual(440);
    expect(cut.ms).toBeLessThan(900);
    expect(cut.details).toMatch(/context deadline exceeded/);
    expect(await readDelta()).toMatchObject({ messages: 10, code: 0 });
  });

  test('failed-precondition: FAILED_PRECONDITION "take a full backup" before any message', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'failed-precondition', times: 1 });
    const res = await readDelta();
    expect(res).toMatchObject({ messages: 0, code: status.FAILED_PRECONDITION });
    expect(res.details).toMatch(/take a full backup/);
    expect(await readDelta()).toMatchObject({ messages: 10, code: 0 });
  });

  test('flaky: the same seed fails the same calls on every run; p=0 never, p=1 always', async () => {
    const pattern = async (): Promise<number[]> => {
      await addFault({ rpc: 'GetMetadataDelta', action: 'flaky', probability: 0.5, seed: 42, times: 12 });
      const codes: number[] = [];
      for (let i = 0; i < 12; i++) codes.push((await readDelta(1000)).code);
      await adminRequest(admin, 'DELETE', '/faults');
      return codes;
    };
    const first = await pattern();
    expect(await pattern()).toEqual(first);
    expect(first).toContain(status.UNAVAILABLE);
    expect(first).toContain(0);
    await addFault({ rpc: 'GetMetadataDelta', action: 'flaky', probability: 1, times: 2 });
    expect((await readDelta()).code).toBe(status.UNAVAILABLE);
    expect((await readDelta()).code).toBe(status.UNAVAILABLE);
    expect((await readDelta()).code).toBe(0); // times: 2 used up
  });
});

describe('which calls a rule applies to', () => {
  test('times K: only the first K matching calls', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'fail', times: 2 });
    expect((await readDelta()).code).toBe(status.UNAVAILABLE);
    expect((await readDelta()).code).toBe(status.UNAVAILABLE);
    expect((await readDelta()).code).toBe(0);
  });

  test('a rule without times applies to every matching call', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'fail' });
    for (let i = 0; i < 3; i++) expect((await readDelta()).code).toBe(status.UNAVAILABLE);
  });

  test('snapshot and volume: only calls about them; other RPCs untouched', async () => {
    await addFault({ rpc: 'GetMetadataAllocated', action: 'fail', snapshot: otherSnap });
    await addFault({ rpc: 'GetMetadataAllocated', action: 'fail', code: 'ABORTED', volume: volumeId });
    const allocated = (snapshotId: string) =>
      t.metadata.collect('getMetadataAllocated', { snapshotId }).then(
        () => 0,
        (e: RpcError) => e.code,
      );
    expect(await allocated(otherSnap)).toBe(status.UNAVAILABLE);
    expect(await allocated(target)).toBe(status.ABORTED);
    expect((await readDelta()).code).toBe(0);
  });

  test('CreateSnapshot and DeleteSnapshot: fail, and delay before the reply', async () => {
    await addFault({ rpc: 'CreateSnapshot', action: 'fail', code: 'RESOURCE_EXHAUSTED', times: 1 });
    const create = () =>
      t.controller.call('createSnapshot', { name: `fault-snap-${Math.random()}`, sourceVolumeId: otherVolume });
    const err = (await create().catch((e: unknown) => e)) as RpcError;
    expect(err.code).toBe(status.RESOURCE_EXHAUSTED);
    const snap = await create();
    await addFault({ rpc: 'DeleteSnapshot', action: 'delay', delayMs: 300, times: 1 });
    const started = Date.now();
    await t.controller.call('deleteSnapshot', { snapshotId: snap.snapshot!.snapshotId });
    expect(Date.now() - started).toBeGreaterThanOrEqual(290);
  });

  test('fired faults are counted in the metrics by RPC and action', async () => {
    await addFault({ rpc: 'GetMetadataDelta', action: 'fail-after', afterMessages: 1, times: 1 });
    await readDelta();
    expect(await metricsText()).toMatch(
      /cbt_csi_faults_fired_total\{rpc="GetMetadataDelta",action="fail-after"\} [1-9]/,
    );
  });
});

describe('rules and the admin endpoint', () => {
  test('malformed rules are rejected naming the field', () => {
    const bad: [unknown, RegExp][] = [
      [{ action: 'fail' }, /rule\.rpc: required/],
      [{ rpc: 'GetMetadataDelta', action: 'explode' }, /rule\.action: "explode" is not one of/],
      [{ rpc: 'GetMetadataDelta', action: 'fail-after' }, /rule\.afterMessages: required by action fail-after/],
      [{ rpc: 'GetMetadataDelta', action: 'fail', code: 'NOPE' }, /rule\.code: "NOPE" is not a gRPC error code/],
      [
        { rpc: 'GetMetadataDelta', action: 'delay', delayMs: 5, stallMs: 3 },
        /rule\.stallMs: does not apply to action delay/,
      ],
      [
        { rpc: 'CreateSnapshot', action: 'stall', stallMs: 3 },
        /rule\.action: stall applies only to the streaming RPCs/,
      ],
      [{ rpc: 'GetMetadataDelta', action: 'flaky', probability: 2 }, /rule\.probability: must be a number from 0 to 1/],
      [{ rpc: 'GetMetadataDelta', action: 'fail', times: 0 }, /rule\.times: must be an integer of at least 1/],
      [{ rpc: 'GetMetadataDelta', action: 'fail', tims: 1 }, /rule\.tims: unknown field/],
    ];
    for (const [rule, message] of bad) expect(() => parseFaultRule(rule)).toThrow(message);
    expect(() =>
      parseFaultRules({
        faults: [
          { rpc: 'GetMetadataDelta', action: 'fail' },
          { rpc: 'X', action: 'fail' },
        ],
      }),
    ).toThrow(/faults\[1\]\.rpc/);
    expect(() => parseFaultRules({ fault: [] })).toThrow(FaultRuleError);
  });

  test('the admin endpoint refuses a bad rule with 400 naming the field, lists and clears rules', async () => {
    await expect(adminRequest(admin, 'POST', '/faults', { rpc: 'GetMetadataDelta', action: 'delay' })).rejects.toThrow(
      /rule\.delayMs: required by action delay/,
    );
    await addFault({ rpc: 'GetMetadataDelta', action: 'fail', times: 3 });
    await addFault({ rpc: 'DeleteSnapshot', action: 'fail' });
    const listed = ((await adminRequest(admin, 'GET', '/faults')) as { faults: { id: number; rpc: string }[] }).faults;
    expect(listed.map((r) => r.rpc)).toEqual(['GetMetadataDelta', 'DeleteSnapshot']);
    await adminRequest(admin, 'DELETE', `/faults/${listed[0]!.id}`);
    const left = ((await adminRequest(admin, 'GET', '/faults')) as { faults: { rpc: string }[] }).faults;
    expect(left.map((r) => r.rpc)).toEqual(['DeleteSnapshot']);
    expect((await readDelta()).code).toBe(0);
  });

  test('the faults.yaml example in docs/for-backup-vendors.md is a valid rules file', () => {
    const doc = fs.readFileSync(path.join(REPO_ROOT, 'docs/for-backup-vendors.md'), 'utf8');
    const block = /```text\n(# faults\.yaml[^\n]*\n[\s\S]*?)```/.exec(doc)?.[1];
    expect(block).toBeDefined();
    const rules = parseFaultRules(parseYaml(block!));
    expect(rules.map((r) => r.action)).toEqual(['fail-after', 'failed-precondition', 'deadline', 'flaky']);
  });

  test('the admin socket is mode 0600 whatever the umask', () => {
    expect(fs.statSync(admin).mode & 0o777).toBe(0o600);
  });

  test('no admin endpoint unless configured: a default driver has no rules and no admin socket', async () => {
    const plain = await startTestDriver();
    try {
      expect(plain.driver.faults.list()).toEqual([]);
      expect(fs.readdirSync(plain.dir).filter((f) => f.includes('admin'))).toEqual([]);
    } finally {
      await plain.stop();
    }
  });
});
