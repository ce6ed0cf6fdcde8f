/**
 * src/rpc/interceptors.ts writes one log line per RPC. An INTERNAL answer tells the client only
 * "internal error", so its line (at error level) must carry where the failure came from: the thrown
 * error's message and stack. Other failures are logged at info with the message the client got.
 */
import { Writable } from 'node:stream';
import { Code, ConnectError, createClient, createRouterTransport } from '@connectrpc/connect';
import { describe, expect, test } from 'vitest';
import { Identity } from '../../src/gen/csi/v1/csi_pb.js';
import { createLogger } from '../../src/logging.js';
import { DriverMetrics } from '../../src/metrics.js';
import { observeRpcs } from '../../src/rpc/interceptors.js';

function failingIdentity(thrown: () => unknown) {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l.trim()) lines.push(JSON.parse(l));
      done();
    },
  });
  const logger = createLogger('info', sink);
  const transport = createRouterTransport(
    (router) =>
      router.service(Identity, {
        getPluginInfo() {
          throw thrown();
        },
      }),
    { router: { interceptors: [observeRpcs(logger, new DriverMetrics())] } },
  );
  return { client: createClient(Identity, transport), lines };
}

async function statusOf(call: Promise<unknown>): Promise<ConnectError> {
  const err = await call.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ConnectError);
  return err as ConnectError;
}

describe('the RPC log line of a failed call', () => {
  test('an error of no known type: the client gets INTERNAL "internal error"; the error-level line has its message and stack', async () => {
    function stageSomething(): never {
      throw new Error('loop device /dev/loop9 vanished');
    }
    const { client, lines } = failingIdentity(() => {
      try {
        stageSomething();
      } catch (err) {
        return err;
      }
    });
    const err = await statusOf(client.getPluginInfo({}));
    expect([err.code, err.rawMessage]).toEqual([Code.Internal, 'internal error']);
    const line = lines.find((l) => l.msg === 'rpc');
    expect(line).toMatchObject({ level: 'error', method: 'GetPluginInfo', code: 'INTERNAL', error: 'internal error' });
    expect(line?.cause).toContain('Error: loop device /dev/loop9 vanished');
    expect(line?.cause).toContain('at stageSomething');
  });

  test('a thrown value that is not an Error is logged as its string form', async () => {
    const { client, lines } = failingIdentity(() => 'plain string');
    expect((await statusOf(client.getPluginInfo({}))).code).toBe(Code.Internal);
    expect(lines.find((l) => l.msg === 'rpc')).toMatchObject({ level: 'error', cause: 'plain string' });
  });

  test('a status the handler chose is logged at info with the message the client got, and no cause', async () => {
    const { client, lines } = failingIdentity(() => new ConnectError('volume_id is empty', Code.InvalidArgument));
    expect((await statusOf(client.getPluginInfo({}))).code).toBe(Code.InvalidArgument);
    const line = lines.find((l) => l.msg === 'rpc');
    expect(line).toMatchObject({ level: 'info', code: 'INVALID_ARGUMENT', error: 'volume_id is empty' });
    expect(line).not.toHaveProperty('cause');
  });
});
