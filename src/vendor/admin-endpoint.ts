/**
 * The admin endpoint: a unix socket (mode 0600, so only root on the node, or `kubectl exec` into the
 * plugin pod, reaches it) over which `cbt-csi faults add|list|clear` change the fault rules of a running
 * driver. Plain HTTP/1.1 with JSON bodies; off unless `serve --admin-endpoint` names a path.
 *
 *   GET /faults            the rules in force, with how often each matched and fired
 *   POST /faults           add rules (a rule, a list, or {faults: [...]}); 400 names the bad field
 *   DELETE /faults[/ID]    remove every rule, or one
 */
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import type { Logger } from '../logging.js';
import { FaultRuleError, parseFaultRule, parseFaultRules, type FaultRule } from './fault-rules.js';
import type { ActiveFault, FaultInjector } from './fault-injector.js';

/** Largest request body: rules are small. */
const MAX_BODY_BYTES = 1024 * 1024;

export interface AdminEndpoint {
  readonly path: string;
  close(): Promise<void>;
}

export async function startAdminEndpoint(
  socketPath: string,
  faults: FaultInjector,
  logger: Logger,
): Promise<AdminEndpoint> {
  await removeStaleSocket(socketPath);
  const server = http.createServer((req, res) => {
    handle(req, faults).then(
      ({ status, body }) => res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body)),
      (err: unknown) => {
        logger.error({ err: String(err) }, 'admin request failed');
        res.writeHead(500, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'internal error' }));
      },
    );
  });
  // The socket is made with the umask in force: make it private from the first moment, then say so explicitly.
  const umask = process.umask(0o177);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
  } finally {
    process.umask(umask);
  }
  fs.chmodSync(socketPath, 0o600);
  logger.info({ adminEndpoint: socketPath }, 'admin endpoint listening');
  return {
    path: socketPath,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
        fs.rmSync(socketPath, { force: true });
      }),
  };
}

/** A dead socket left by a previous run may be replaced; a live one, or anything else, is not ours to remove. */
async function removeStaleSocket(socketPath: string): Promise<void> {
  const st = fs.lstatSync(socketPath, { throwIfNoEntry: false });
  if (!st) return;
  if (!st.isSocket())
    throw new Error(`admin endpoint ${socketPath} exists and is not a socket; refusing to replace it`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new Error(`admin endpoint ${socketPath} is in use by another process`);
  fs.rmSync(socketPath);
}

async function handle(req: http.IncomingMessage, faults: FaultInjector): Promise<{ status: number; body: unknown }> {
  const url = req.url ?? '/';
  const one = /^\/faults\/(\d+)$/.exec(url);
  if (url === '/faults' && req.method === 'GET') return { status: 200, body: { faults: faults.list() } };
  if (url === '/faults' && req.method === 'POST') {
    let document: unknown;
    try {
      document = JSON.parse(await readBody(req));
    } catch (err) {
      return { status: 400, body: { error: `the body is not JSON: ${(err as Error).message}` } };
    }
    let rules: FaultRule[];
    try {
      rules =
        Array.isArray(document) || (typeof document === 'object' && document !== null && 'faults' in document)
          ? parseFaultRules(document)
          : [parseFaultRule(document)];
    } catch (err) {
      if (err instanceof FaultRuleError) return { status: 400, body: { error: err.message } };
      throw err;
    }
    return { status: 201, body: { added: faults.add(rules) } };
  }
  if (url === '/faults' && req.method === 'DELETE') return { status: 200, body: { removed: faults.clear() } };
  if (one && req.method === 'DELETE') {
    const removed = faults.clear(Number(one[1]));
    return removed ? { status: 200, body: { removed } } : { status: 404, body: { error: `no fault rule ${one[1]}` } };
  }
  return { status: 404, body: { error: `no such admin request: ${req.method} ${url.slice(0, 128)}` } };
}

function readBody(req: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('the body is larger than 1 MiB'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/** Client side, for `cbt-csi faults`: one request, JSON both ways; rejects with the server's error text. */
export function adminRequest(
  socketPath: string,
  method: 'GET' | 'POST' | 'DELETE',
  urlPath: string,
  body?: unknown,
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      {
        socketPath,
        method,
        path: urlPath,
        headers: payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {},
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          let parsed: unknown;
          try {
            parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch {
            reject(new Error(`the admin endpoint answered ${res.statusCode} with a body that is not JSON`));
            return;
          }
          if ((res.statusCode ?? 500) >= 400)
            reject(new Error((parsed as { error?: string }).error ?? `HTTP ${res.statusCode}`));
          else resolve(parsed);
        });
      },
    );
    req.on('error', (err) => reject(new Error(`cannot reach the admin endpoint ${socketPath}: ${err.message}`)));
    req.end(payload);
  });
}

export type { ActiveFault };
