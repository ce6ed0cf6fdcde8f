/**
 * src/rpc/status.ts is the one place errors become gRPC statuses: engine errors by cause, node data-plane
 * errors by kind, failed tools, anything else (INTERNAL, details withheld), and the two statuses the
 * server writes itself (an unknown method, a request body that does not decode).
 */
import { describe, expect, test } from 'vitest';
import { Code, ConnectError } from '@connectrpc/connect';
import {
  AlreadyExistsError,
  BusyError,
  InvalidArgumentError,
  NoSpaceError,
  NotFoundError,
  OutOfRangeError,
  StoreClosedError,
  UnrelatedSnapshotsError,
} from '../../storage-engine/index.js';
import { CommandError } from '../../src/dataplane/command.js';
import { NodeError } from '../../src/dataplane/node-volumes.js';
import {
  NODE_CODES,
  correctUndecodableStatus,
  toConnectError,
  translateNodeErrors,
  unimplementedMethodHeaders,
} from '../../src/rpc/status.js';

describe('engine errors', () => {
  test.each([
    [new NotFoundError('x'), Code.NotFound],
    [new AlreadyExistsError('x'), Code.AlreadyExists],
    [new InvalidArgumentError('x'), Code.InvalidArgument],
    [new OutOfRangeError('x'), Code.OutOfRange],
    [new NoSpaceError('x'), Code.ResourceExhausted],
    [new BusyError('x'), Code.FailedPrecondition],
    [new UnrelatedSnapshotsError('x'), Code.InvalidArgument],
    [new StoreClosedError(), Code.Unavailable],
  ])('%s is answered with gRPC code %i and its own message', (err, code) => {
    const mapped = toConnectError(err);
    expect(mapped.code).toBe(code);
    expect(mapped.rawMessage).toBe(err.message);
  });
});

describe('node data-plane errors', () => {
  test('every NodeError kind has the code the table names, with its message', () => {
    for (const [kind, code] of Object.entries(NODE_CODES)) {
      const mapped = toConnectError(new NodeError(kind as keyof typeof NODE_CODES, `because ${kind}`));
      expect(mapped.code).toBe(code);
      expect(mapped.rawMessage).toBe(`because ${kind}`);
    }
  });

  test('translateNodeErrors turns NodeErrors and failed tools into statuses, and passes anything else on unchanged', async () => {
    const refused = await translateNodeErrors(() => Promise.reject(new NodeError('not-found', 'no such volume'))).catch(
      (e: unknown) => e,
    );
    expect(refused).toBeInstanceOf(ConnectError);
    expect((refused as ConnectError).code).toBe(Code.NotFound);
    const tool = new CommandError('mount', ['x'], 32, null, 'mount: wrong fs type', false);
    const failed = await translateNodeErrors(() => Promise.reject(tool)).catch((e: unknown) => e);
    expect((failed as ConnectError).code).toBe(Code.Internal);
    expect((failed as ConnectError).rawMessage).toBe(tool.message);
    const other = new Error('bug');
    expect(await translateNodeErrors(() => Promise.reject(other)).catch((e: unknown) => e)).toBe(other);
    expect(await translateNodeErrors(() => Promise.resolve(7))).toBe(7);
  });
});

describe('anything else', () => {
  test('is INTERNAL with its details withheld', () => {
    const mapped = toConnectError(new Error('secret path /x'));
    expect(mapped.code).toBe(Code.Internal);
    expect(mapped.rawMessage).toBe('internal error');
  });
});

describe('statuses the server writes itself', () => {
  test('an unknown method is UNIMPLEMENTED, in a gRPC response', () => {
    const headers = unimplementedMethodHeaders('/csi.v1.Node/NodeStageVolume');
    expect(headers['content-type']).toBe('application/grpc');
    expect(Number(headers['grpc-status'])).toBe(Code.Unimplemented);
    expect(decodeURIComponent(String(headers['grpc-message']))).toBe('no such method: /csi.v1.Node/NodeStageVolume');
  });

  test("connect's INTERNAL for an undecodable body becomes INVALID_ARGUMENT; other trailers pass unchanged", () => {
    const undecodable = {
      'grpc-status': String(Code.Internal),
      'grpc-message': encodeURIComponent('parse binary: premature EOF'),
    };
    expect(Number(correctUndecodableStatus(undecodable)['grpc-status'])).toBe(Code.InvalidArgument);
    const internal = { 'grpc-status': String(Code.Internal), 'grpc-message': 'internal%20error' };
    expect(correctUndecodableStatus(internal)).toBe(internal);
  });
});
