/**
 * gRPC protocol: a method the server does not have is answered with status UNIMPLEMENTED (a proper gRPC
 * status in HTTP 200 headers, the way grpc-go servers answer), not a bare HTTP 404.
 */
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestDriver, type TestDriver } from '../support/test-driver.js';

let driver: TestDriver;
beforeAll(async () => {
  driver = await startTestDriver();
});
afterAll(async () => {
  await driver.stop();
});

function callUnknown(path: string): Promise<grpc.ServiceError> {
  const client = new grpc.Client(driver.target, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      path,
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.alloc(0),
      (err) => {
        client.close();
        if (err) resolve(err);
        else reject(new Error(`${path} unexpectedly succeeded`));
      },
    );
  });
}

describe('unknown services and methods', () => {
  it('a call to a service the driver does not serve gets UNIMPLEMENTED with a gRPC status message', async () => {
    const err = await callUnknown('/csi.v1.NoSuchService/NoSuchMethod');
    expect(err.code).toBe(grpc.status.UNIMPLEMENTED);
    // A bare HTTP 404 would reach grpc-js as a synthesized message about the HTTP status instead.
    expect(err.details).toContain('no such method');
  });

  it('a call to an unknown method of a served service gets UNIMPLEMENTED', async () => {
    const err = await callUnknown('/csi.v1.Identity/NoSuchMethod');
    expect(err.code).toBe(grpc.status.UNIMPLEMENTED);
  });

  it('the server keeps serving after unknown calls', async () => {
    const info = await driver.identity.call('getPluginInfo', {});
    expect(info.name).toBe('cbt.csi.dev');
  });
});
