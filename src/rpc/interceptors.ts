/**
 * Server interceptor: maps errors to statuses (via status.ts), and writes one log line and one metric
 * sample per RPC when it ends (for streams, when the last message is sent or the stream fails).
 */
import type { Interceptor, StreamResponse, UnaryResponse } from '@connectrpc/connect';
import { Code, ConnectError, createContextKey } from '@connectrpc/connect';
import { toJson } from '@bufbuild/protobuf';
import type { Logger } from '../logging.js';
import type { DriverMetrics } from '../metrics.js';
import { codeName, toConnectError } from './status.js';

/** The node a call was forwarded to (multi-node routing sets it), logged with the call. */
export const forwardedToKey = createContextKey<string | undefined>(undefined, { description: 'forwarded to node' });

export interface ObserveOptions {
  /** Items a streamed response message carries (e.g. BlockMetadata tuples), counted in logs and metrics; none if absent. */
  countItems?: (message: object) => number;
}

export function observeRpcs(logger: Logger, metrics: DriverMetrics, options: ObserveOptions = {}): Interceptor {
  const countItems = options.countItems ?? (() => 0);
  return (next) => async (req) => {
    const method = req.method.name;
    const started = process.hrtime.bigint();
    let tuples = 0;
    const finish = (err: unknown): ConnectError | undefined => {
      // A client that cancels mid-stream makes the pending write fail; report the cancellation, not that failure.
      const cancelled = err !== undefined && req.signal.aborted && req.signal.reason instanceof ConnectError;
      const mapped =
        err === undefined ? undefined : cancelled ? (req.signal.reason as ConnectError) : toConnectError(err);
      const code = mapped ? mapped.code : 0;
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      const forwardedTo = req.contextValues.get(forwardedToKey);
      metrics.rpcTotal.inc({ method, code: codeName(code) });
      metrics.rpcSeconds.observe({ method }, seconds);
      if (tuples > 0) metrics.metadataTuples.inc({ method }, tuples);
      const line = {
        method,
        code: codeName(code),
        ms: Math.round(seconds * 1e6) / 1e3,
        ...(tuples > 0 ? { tuples } : {}),
        ...(forwardedTo !== undefined ? { forwardedTo } : {}),
        ...(mapped ? { error: mapped.rawMessage } : {}),
      };
      // The client is told only "internal error"; the log keeps where it came from, stack included.
      if (mapped && code === Code.Internal) logger.error({ ...line, cause: causeText(mapped.cause) }, 'rpc');
      else logger.info(line, 'rpc');
      if (!req.stream && logger.isLevelEnabled('debug')) {
        // JSON form: int64 fields as strings; the logger redacts `secrets` wherever it appears.
        logger.debug({ method, request: toJson(req.method.input, req.message) }, 'rpc request');
      }
      return mapped;
    };
    let res: UnaryResponse | StreamResponse;
    try {
      res = await next(req);
    } catch (err) {
      throw finish(err);
    }
    if (!res.stream) {
      finish(undefined);
      return res;
    }
    const inner = res.message;
    async function* observed() {
      try {
        for await (const message of inner) {
          tuples += countItems(message as object);
          yield message;
        }
      } catch (err) {
        throw finish(err);
      }
      finish(undefined);
    }
    return { ...res, message: observed() } as StreamResponse;
  };
}

/** An error's stack (which names its message) or, for anything else thrown, its string form. */
function causeText(cause: unknown): string {
  return cause instanceof Error ? (cause.stack ?? String(cause)) : String(cause);
}
