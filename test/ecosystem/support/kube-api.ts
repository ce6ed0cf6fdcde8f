/**
 * A small REST client for the test's kube-apiserver: JSON over HTTPS with a bearer token, the server's
 * own CA, and polling until an object reaches a state. Tests use it where kubectl would cost a process
 * per call (waiting on controllers is mostly polling).
 */
import https from 'node:https';

/** A Kubernetes object as the API server returns it; tests read the fields they need. */
export interface KubeObject {
  apiVersion?: string;
  kind?: string;
  metadata: {
    name: string;
    namespace?: string;
    uid?: string;
    resourceVersion?: string;
    annotations?: Record<string, string>;
    labels?: Record<string, string>;
    finalizers?: string[];
    deletionTimestamp?: string;
  };
  // biome-ignore lint/suspicious/noExplicitAny: objects of any kind; each test reads the fields it asserts on
  spec?: any;
  // biome-ignore lint/suspicious/noExplicitAny: as spec
  status?: any;
  // biome-ignore lint/suspicious/noExplicitAny: as spec
  [key: string]: any;
}

/** A non-2xx answer, with the API server's Status message. */
export class KubeApiError extends Error {
  constructor(
    readonly method: string,
    readonly path: string,
    readonly status: number,
    readonly body: string,
  ) {
    super(`${method} ${path}: HTTP ${status}: ${body.slice(0, 2000)}`);
  }
}

export type PatchType = 'merge' | 'json' | 'strategic';
const PATCH_CONTENT_TYPE: Record<PatchType, string> = {
  merge: 'application/merge-patch+json',
  json: 'application/json-patch+json',
  strategic: 'application/strategic-merge-patch+json',
};

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export class KubeApi {
  private readonly agent: https.Agent;

  constructor(
    readonly server: string,
    private readonly token: string,
    ca: string | Buffer,
  ) {
    this.agent = new https.Agent({ ca, keepAlive: true, maxSockets: 4 });
  }

  /** One request; resolves with the status and the parsed body (or undefined when empty). */
  request<T = KubeObject>(
    method: string,
    path: string,
    body?: unknown,
    contentType = 'application/json',
  ): Promise<{ status: number; body: T }> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = https.request(
        new URL(path, this.server),
        {
          method,
          agent: this.agent,
          headers: {
            authorization: `Bearer ${this.token}`,
            accept: 'application/json',
            ...(payload ? { 'content-type': contentType, 'content-length': payload.length } : {}),
          },
          timeout: 30_000,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            const status = res.statusCode ?? 0;
            if (status < 200 || status >= 300) {
              reject(new KubeApiError(method, path, status, text));
              return;
            }
            resolve({ status, body: (text ? JSON.parse(text) : undefined) as T });
          });
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`${method} ${path}: no answer in 30 s`)));
      req.on('error', reject);
      req.end(payload);
    });
  }

  async get<T = KubeObject>(path: string): Promise<T> {
    return (await this.request<T>('GET', path)).body;
  }

  /** The object, or undefined if the API server answers 404. */
  async find<T = KubeObject>(path: string): Promise<T | undefined> {
    try {
      return await this.get<T>(path);
    } catch (err) {
      if (err instanceof KubeApiError && err.status === 404) return undefined;
      throw err;
    }
  }

  async list(path: string): Promise<KubeObject[]> {
    return (await this.get<{ items: KubeObject[] }>(path)).items;
  }

  async create<T = KubeObject>(path: string, object: unknown): Promise<T> {
    return (await this.request<T>('POST', path, object)).body;
  }

  async patch<T = KubeObject>(path: string, patch: unknown, type: PatchType = 'merge'): Promise<T> {
    return (await this.request<T>('PATCH', path, patch, PATCH_CONTENT_TYPE[type])).body;
  }

  /** Deletes (with DeleteOptions, e.g. { gracePeriodSeconds: 0 }); a 404 counts as done. */
  async delete(path: string, options?: Record<string, unknown>): Promise<void> {
    try {
      await this.request('DELETE', path, options && { apiVersion: 'v1', kind: 'DeleteOptions', ...options });
    } catch (err) {
      if (!(err instanceof KubeApiError && err.status === 404)) throw err;
    }
  }

  /**
   * Removes one finalizer, as the controller that owns it does; others' finalizers stay. Retries when a
   * concurrent change moved it (the JSON patch tests the index first). Resolves when it is gone.
   */
  async removeFinalizer(path: string, finalizer: string): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      const object = await this.find(path);
      const at = object?.metadata.finalizers?.indexOf(finalizer) ?? -1;
      if (at < 0) return;
      try {
        await this.patch(
          path,
          [
            { op: 'test', path: `/metadata/finalizers/${at}`, value: finalizer },
            { op: 'remove', path: `/metadata/finalizers/${at}` },
          ],
          'json',
        );
        return;
      } catch (err) {
        if (!(err instanceof KubeApiError && (err.status === 422 || err.status === 409)) || attempt >= 20) throw err;
      }
    }
  }

  /**
   * Polls `path` until `done(object)` holds (the object may be undefined: not found); resolves with the
   * last object. On timeout the error names `what` and shows the object as last seen.
   */
  async waitFor<T = KubeObject>(
    path: string,
    done: (object: T | undefined) => boolean,
    what: string,
    timeoutMs = 60_000,
  ): Promise<T | undefined> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const object = await this.find<T>(path);
      if (done(object)) return object;
      if (Date.now() > deadline)
        throw new Error(
          `timed out after ${timeoutMs / 1000} s waiting for ${what}; last seen:\n${JSON.stringify(object, null, 2)}`,
        );
      await sleep(250);
    }
  }

  close(): void {
    this.agent.destroy();
  }
}
