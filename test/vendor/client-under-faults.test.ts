/**
 * The backup toolkit's client (src/client) against a real `cbt-csi serve` process whose faults come from
 * `--faults FILE` at start and from `cbt-csi faults add` at run time: for each fault kind the client
 * resumes, waits, or gives up exactly as docs/for-backup-vendors.md says, and every fault that fired is
 * in the driver's log and in its /metrics.
 *
 * The store is prepared through the engine before the driver starts (no root needed), so the snapshot
 * IDs the rules name are known when the faults file is written. Each scenario has its own volume, with a
 * base and a target snapshot 200 separate 4 KiB blocks apart; the driver sends 10 tuples a message, so
 * an uncut delta is 20 messages.
 */
import { execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { BlockStore } from '../../storage-engine/index.js';
import {
  connectCsiDirect,
  FailedPreconditionError,
  PermissionDeniedError,
  RetriesExhaustedError,
  type Extent,
  type SnapshotMetadataClient,
} from '../../src/client/index.js';
import { adminRequest, type ActiveFault } from '../../src/vendor/admin-endpoint.js';
import { appendAnswerRun } from '../../src/vendor/answers.js';
import { generate, type PatternTarget } from '../../src/vendor/generate.js';
import { REPO_ROOT, TSX_LOADER, spawnDriver } from '../support/test-driver.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCKS = 200;
const TUPLES_A_MESSAGE = 10;
const MESSAGES = BLOCKS / TUPLES_A_MESSAGE;

const SCENARIOS = [
  'failAfter',
  'stall',
  'delay',
  'deadline',
  'precondition',
  'flaky',
  'firstK',
  'exhausted',
  'notRetried',
] as const;
type Scenario = (typeof SCENARIOS)[number];

const exec = promisify(execFile);
const cli = (args: string[]) =>
  exec(process.execPath, ['--import', TSX_LOADER, path.join(REPO_ROOT, 'src/cli.ts'), ...args]);

let dir: string;
let admin: string;
let endpoint: string;
let metricsUrl: string;
let child: ChildProcess;
let driverLog: () => string;
const pairs = {} as Record<Scenario, { base: string; target: string }>;
const checked = {} as Record<'checkCut' | 'checkPrecondition', { base: string; target: string }>;
let answers: string;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-client-faults-'));
  admin = path.join(dir, 'admin.sock');
  endpoint = `unix://${path.join(dir, 'csi.sock')}`;
  const store = BlockStore.open(path.join(dir, 'state', 'store'));
  for (const name of SCENARIOS) {
    const volumeId = (await store.createVolume({ capacityBytes: 64 * MiB })).id;
    const base = (await store.createSnapshot({ volumeId })).id;
    for (let i = 0; i < BLOCKS; i++) store.write(volumeId, i * 8 * KiB, Buffer.alloc(4 * KiB, i + 1));
    pairs[name] = { base, target: (await store.createSnapshot({ volumeId })).id };
  }
  // Two volumes with known answers: a seeded generate run between base and target, as a vendor's would be.
  answers = path.join(dir, 'answers.jsonl');
  for (const name of ['checkCut', 'checkPrecondition'] as const) {
    const volumeId = (await store.createVolume({ capacityBytes: 64 * MiB })).id;
    const base = (await store.createSnapshot({ volumeId })).id;
    await sleep(2);
    const target: PatternTarget = {
      name: `engine:${volumeId}`,
      capacityBytes: 64 * MiB,
      write: async (offset, data) => store.write(volumeId, offset, data),
      discard: async (offset, length) => store.trim(volumeId, offset, length),
      sync: async () => store.flush(volumeId),
      close: async () => undefined,
    };
    const run = await generate({ pattern: 'random', seed: 7, count: 300, blockSize: 4096 }, target);
    // One answers file for both: check takes the runs that fall between each pair's cuts.
    appendAnswerRun(answers, run);
    await sleep(2);
    checked[name] = { base, target: (await store.createSnapshot({ volumeId })).id };
    await sleep(2);
  }
  await store.close();
  // Rules in force from the start: one per scenario, each about that scenario's target snapshot only.
  const faults = path.join(dir, 'faults.yaml');
  fs.writeFileSync(
    faults,
    [
      'faults:',
      '  - rpc: GetMetadataDelta',
      `    snapshot: ${pairs.failAfter.target}`,
      '    action: fail-after',
      '    afterMessages: 3',
      '    code: UNAVAILABLE',
      '    times: 2',
      '  - rpc: GetMetadataDelta',
      `    snapshot: ${pairs.stall.target}`,
      '    action: stall',
      '    afterMessages: 2',
      '    stallMs: 1500',
      '  - rpc: GetMetadataDelta',
      `    snapshot: ${pairs.delay.target}`,
      '    action: delay',
      '    delayMs: 60',
      '  - rpc: GetMetadataDelta',
      `    snapshot: ${pairs.precondition.target}`,
      '    action: failed-precondition',
      '  - rpc: GetMetadataDelta',
      `    snapshot: ${checked.checkCut.target}`,
      '    action: fail-after',
      '    afterMessages: 2',
      '    times: 1',
      '  - rpc: GetMetadataDelta',
      `    snapshot: ${checked.checkPrecondition.target}`,
      '    action: failed-precondition',
      '',
    ].join('\n'),
  );
  const started = await spawnDriver([
    '--endpoint',
    endpoint,
    '--state-dir',
    path.join(dir, 'state'),
    '--role',
    'controller',
    '--log-level',
    'info',
    '--default-max-results',
    String(TUPLES_A_MESSAGE),
    '--metrics-address',
    '127.0.0.1:0',
    '--faults',
    faults,
    '--admin-endpoint',
    admin,
  ]);
  child = started.child;
  driverLog = started.stdout;
  metricsUrl = /cbt-csi metrics at (\S+)/.exec(started.stderr())![1]!;
}, 120_000);

afterAll(async () => {
  if (child && child.exitCode === null) {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

interface Run {
  extents: Extent[];
  resumes: number;
  /** onResume calls: every reopen, including those before the first message. */
  reopens: { offset: number; code: string }[];
  ms: number;
}

/** A client with short backoffs, so a test of ten retries takes well under a second of waiting. */
function client(reopens: Run['reopens'] = []): SnapshotMetadataClient {
  return connectCsiDirect(endpoint, {
    retry: { initialDelayMs: 10, maxDelayMs: 80 },
    onResume: ({ offset, error }) =>
      reopens.push({ offset, code: String((error as { code?: unknown }).code ?? (error as Error).name) }),
  });
}

/** Lists the delta of a scenario's pair through the client. */
async function listDelta(scenario: Scenario, signal?: AbortSignal): Promise<Run> {
  const reopens: Run['reopens'] = [];
  const c = client(reopens);
  const started = Date.now();
  try {
    const { base, target } = pairs[scenario];
    const listing = await c.delta(base, target, signal ? { signal } : {});
    const extents: Extent[] = [];
    for await (const e of listing) extents.push(e);
    return { extents, resumes: listing.resumes, reopens, ms: Date.now() - started };
  } finally {
    await c.close();
  }
}

/** What any pair's delta is: the 200 blocks written, each its own extent. */
const UNCUT: Extent[] = Array.from({ length: BLOCKS }, (_, i) => ({ offset: i * 8 * KiB, length: 4 * KiB }));

async function rules(): Promise<ActiveFault[]> {
  return ((await adminRequest(admin, 'GET', '/faults')) as { faults: ActiveFault[] }).faults;
}
async function ruleAbout(target: string): Promise<ActiveFault> {
  const rule = (await rules()).find((r) => r.snapshot === target);
  if (!rule) throw new Error(`no rule about ${target}`);
  return rule;
}

describe('the client under each fault kind', () => {
  test('an uncut run: 200 extents, no resumes (the reference the others are compared with)', async () => {
    // No rule names firstK's pair yet.
    const run = await listDelta('firstK');
    expect(run.extents).toEqual(UNCUT);
    expect(run).toMatchObject({ resumes: 0, reopens: [] });
  });

  test('fail-after (faults file): UNAVAILABLE after 3 messages, twice; the client resumes twice and the extents equal an uncut run', async () => {
    const run = await listDelta('failAfter');
    expect(run.extents).toEqual(UNCUT);
    expect(run.resumes).toBe(2);
    // Cut after 3 messages of 10 tuples: the first reopen starts at the end of the 30th extent; the second
    // stream (from there) is cut after 3 more messages.
    expect(run.reopens.map((r) => r.offset)).toEqual([UNCUT[29]!.offset + 4 * KiB, UNCUT[59]!.offset + 4 * KiB]);
    expect(run.reopens.every((r) => r.code === '14')).toBe(true); // Code.Unavailable
    expect(await ruleAbout(pairs.failAfter.target)).toMatchObject({ matched: 2, fired: 2 });
    // The rule's two uses are spent: the next call is clean.
    expect(await listDelta('failAfter')).toMatchObject({ extents: UNCUT, resumes: 0, reopens: [] });
  });

  test("stall (faults file): the listing still completes, late; the caller's AbortSignal ends it during a stall", async () => {
    const run = await listDelta('stall');
    expect(run.extents).toEqual(UNCUT);
    expect(run).toMatchObject({ resumes: 0, reopens: [] });
    expect(run.ms).toBeGreaterThanOrEqual(1450);
    const started = Date.now();
    const aborted = await listDelta('stall', AbortSignal.timeout(400)).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect((aborted as Error).name).toBe('TimeoutError');
    expect(Date.now() - started).toBeLessThan(1400); // it did not wait for the stall to end
  });

  test('delay (faults file): every message late, the listing completes; an AbortSignal deadline fires mid-listing', async () => {
    const run = await listDelta('delay');
    expect(run.extents).toEqual(UNCUT);
    expect(run).toMatchObject({ resumes: 0, reopens: [] });
    expect(run.ms).toBeGreaterThanOrEqual(MESSAGES * 60 - 20);
    const aborted = await listDelta('delay', AbortSignal.timeout(300)).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect((aborted as Error).name).toBe('TimeoutError');
  });

  test('failed-precondition (faults file): a typed error that says take a full backup, not retried', async () => {
    const err = await listDelta('precondition').then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(FailedPreconditionError);
    // Said once: the injected message already says it, the client's advice is not added again.
    expect((err as Error).message.match(/take a full backup/g)).toHaveLength(1);
    const rule = await ruleAbout(pairs.precondition.target);
    expect(rule).toMatchObject({ matched: 1, fired: 1 }); // one call: no retry
  });

  test('deadline (cbt-csi faults add): each stream ends with DEADLINE_EXCEEDED at the deadline; the client resumes until done', async () => {
    const added = await cli([
      'faults',
      'add',
      '--admin-endpoint',
      admin,
      '--rpc',
      'GetMetadataDelta',
      '--snapshot',
      pairs.deadline.target,
      '--action',
      'deadline',
      '--deadline-ms',
      '400',
      '--delay-ms',
      '60',
    ]);
    expect(added.stdout).toMatch(/^added \d+\tGetMetadataDelta\tdeadline\tforever/m);
    const run = await listDelta('deadline');
    expect(run.extents).toEqual(UNCUT);
    // 20 messages at 60 ms do not fit in one 400 ms stream; each resumed stream goes on where the last ended.
    expect(run.resumes).toBeGreaterThanOrEqual(2);
    expect(run.reopens.every((r) => r.code === '4')).toBe(true); // Code.DeadlineExceeded
    const offsets = run.reopens.map((r) => r.offset);
    expect([...offsets].sort((a, b) => a - b)).toEqual(offsets);
    const rule = await ruleAbout(pairs.deadline.target);
    expect(rule.fired).toBe(run.reopens.length);
  }, 60_000);

  test('flaky with a seed (cbt-csi faults add --file): the same seed fails the same calls, run after run', async () => {
    const file = path.join(dir, 'flaky.yaml');
    const rule = {
      rpc: 'GetMetadataDelta',
      snapshot: pairs.flaky.target,
      action: 'flaky',
      probability: 0.5,
      seed: 42,
    };
    fs.writeFileSync(file, `- ${JSON.stringify(rule)}\n`);
    await cli(['faults', 'add', '--admin-endpoint', admin, '--file', file]);
    /** Ten listings in a row: how many reopens each needed before its first message. */
    const pattern = async (): Promise<number[]> => {
      const out: number[] = [];
      for (let i = 0; i < 10; i++) {
        const run = await listDelta('flaky');
        expect(run.extents).toEqual(UNCUT);
        out.push(run.reopens.length);
      }
      return out;
    };
    const first = await pattern();
    // A fresh rule with the same seed starts the same sequence again.
    const flaky = await ruleAbout(pairs.flaky.target);
    await adminRequest(admin, 'DELETE', `/faults/${flaky.id}`);
    await adminRequest(admin, 'POST', '/faults', rule);
    expect(await pattern()).toEqual(first);
    // p = 0.5: some listings got through at once, some needed retries; every one completed.
    expect(first).toContain(0);
    expect(first.some((n) => n > 0)).toBe(true);
  }, 60_000);

  test('the first K calls, then clean: K failures before the first message are retried, the listing completes', async () => {
    await adminRequest(admin, 'POST', '/faults', {
      rpc: 'GetMetadataDelta',
      snapshot: pairs.firstK.target,
      action: 'fail',
      code: 'UNAVAILABLE',
      times: 3,
    });
    const run = await listDelta('firstK');
    expect(run.extents).toEqual(UNCUT);
    expect(run.reopens).toEqual([
      { offset: 0, code: '14' },
      { offset: 0, code: '14' },
      { offset: 0, code: '14' },
    ]);
    expect(await ruleAbout(pairs.firstK.target)).toMatchObject({ matched: 3, fired: 3 });
    expect(await listDelta('firstK')).toMatchObject({ extents: UNCUT, reopens: [] });
  });

  test('more failures in a row than the retry policy allows: RetriesExhaustedError after 1 + 10 calls', async () => {
    await adminRequest(admin, 'POST', '/faults', {
      rpc: 'GetMetadataDelta',
      snapshot: pairs.exhausted.target,
      action: 'fail',
      code: 'UNAVAILABLE',
    });
    const err = await listDelta('exhausted').then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(RetriesExhaustedError);
    expect(await ruleAbout(pairs.exhausted.target)).toMatchObject({ matched: 11, fired: 11 });
  });

  test('a code a retry cannot fix (PERMISSION_DENIED) is a typed error at once, not retried', async () => {
    await adminRequest(admin, 'POST', '/faults', {
      rpc: 'GetMetadataDelta',
      snapshot: pairs.notRetried.target,
      action: 'fail',
      code: 'PERMISSION_DENIED',
      message: 'injected: no access',
    });
    const err = await listDelta('notRetried').then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(PermissionDeniedError);
    expect((err as PermissionDeniedError).driverMessage).toBe('injected: no access');
    expect(await ruleAbout(pairs.notRetried.target)).toMatchObject({ matched: 1, fired: 1 });
  });
});

describe('cbt-csi check reads through the client', () => {
  const checkArgs = (scenario: 'checkCut' | 'checkPrecondition') => [
    'check',
    '--endpoint',
    endpoint,
    '--answers',
    answers,
    '--snapshot',
    checked[scenario].target,
    '--base',
    checked[scenario].base,
  ];

  test('a delta cut mid-stream (fail-after) is resumed by check, which then passes', async () => {
    const res = await cli(checkArgs('checkCut'));
    expect(res.stderr).toMatch(/check: stream cut \(.*stream cut after 2 messages\); resuming at byte \d+/);
    expect(res.stdout).toMatch(/the client resumed 1 cut stream\(s\)/);
    expect(res.stdout).toMatch(/missing: none\n/);
    expect(res.stdout).toMatch(/OK\n$/);
    expect(await ruleAbout(checked.checkCut.target)).toMatchObject({ fired: 1 });
  }, 60_000);

  test('FAILED_PRECONDITION: check exits 1 saying take a full backup, without retrying', async () => {
    const err = (await cli(checkArgs('checkPrecondition')).then(
      () => undefined,
      (e: unknown) => e,
    )) as { code: number; stderr: string };
    expect(err.code).toBe(1);
    expect(err.stderr.match(/take a full backup/g)).toHaveLength(1);
    expect(err.stderr).not.toMatch(/resuming/);
    expect(await ruleAbout(checked.checkPrecondition.target)).toMatchObject({ matched: 1, fired: 1 });
  }, 60_000);
});

describe('every fault that fired is logged and counted', () => {
  test("the driver's log has a 'fault fired' line per firing, and /metrics counts them by RPC and action", async () => {
    const listed = JSON.parse(
      (await cli(['faults', 'list', '--admin-endpoint', admin, '--json'])).stdout,
    ) as ActiveFault[];
    const lines = driverLog()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { msg: string; fault?: number; rpc?: string; action?: string });
    const firedLines = lines.filter((l) => l.msg === 'fault fired');
    const metrics = await (await fetch(metricsUrl)).text();
    const byKind = new Map<string, number>();
    for (const rule of listed) {
      // The log is the driver's record: every firing of every rule still listed has its line.
      expect(firedLines.filter((l) => l.fault === rule.id).length, `rule ${rule.id} (${rule.action})`).toBe(rule.fired);
      const key = `${rule.rpc}/${rule.action}`;
      byKind.set(key, (byKind.get(key) ?? 0) + rule.fired);
    }
    // Rules removed along the way (the first flaky rule) fired too: the metric counts at least what is listed.
    for (const [key, fired] of byKind) {
      const [rpc, action] = key.split('/');
      const m = new RegExp(`cbt_csi_faults_fired_total\\{rpc="${rpc}",action="${action}"\\} (\\d+)`).exec(metrics);
      expect(m, `${key} in /metrics`).not.toBeNull();
      expect(Number(m![1])).toBeGreaterThanOrEqual(fired);
      if (action !== 'flaky') expect(Number(m![1])).toBe(fired);
    }
    for (const action of ['fail-after', 'stall', 'delay', 'deadline', 'failed-precondition', 'flaky', 'fail'])
      expect([...byKind.keys()]).toContain(`GetMetadataDelta/${action}`);
  }, 60_000);
});
