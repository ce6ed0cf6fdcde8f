/**
 * Peers found in Kubernetes: the plugin DaemonSet's pods in its namespace, by label selector; each pod's
 * spec.nodeName is the node whose store it serves, its status.podIP where its peer listener is (every pod
 * listens on the same port). The list is cached for a few seconds and read again when a node is missing or
 * a call to it failed to connect, at most once a second. Needs `pods` `list` in that namespace (the chart's
 * Role gives it).
 */
import fs from 'node:fs';
import { CoreV1Api, KubeConfig, type V1Pod } from '@kubernetes/client-node';
import type { Logger } from '../logging.js';
import type { PeerAddress, PeerDirectory } from './peer-directory.js';

/** The namespace a pod runs in, as its ServiceAccount mount says. */
const SERVICE_ACCOUNT_NAMESPACE = '/var/run/secrets/kubernetes.io/serviceaccount/namespace';

export interface KubernetesDirectoryOptions {
  /** Namespace of the plugin pods; default POD_NAMESPACE, else this pod's own. */
  namespace?: string;
  /** Label selector of the plugin pods, e.g. `app.kubernetes.io/name=cbt-csi,app.kubernetes.io/instance=x`. */
  podSelector: string;
  /** Port every plugin pod's peer listener uses. */
  port: number;
  /** How long a list is trusted; default 5 s. */
  cacheMs?: number;
  /** Shortest time between two lists; default 1 s. */
  minRelistMs?: number;
  /** The API server connection; default: KUBECONFIG, ~/.kube/config, or in-cluster. */
  kubeConfig?: KubeConfig;
}

export class KubernetesPeerDirectory implements PeerDirectory {
  private readonly api: CoreV1Api;
  private readonly namespace: string;
  private readonly cacheMs: number;
  private readonly minRelistMs: number;
  private nodes = new Map<string, PeerAddress>();
  private listedAtMs = Number.NEGATIVE_INFINITY;
  private listing: Promise<void> | undefined;
  private invalidated = false;

  constructor(
    private readonly options: KubernetesDirectoryOptions,
    private readonly logger: Logger,
  ) {
    const kubeConfig = options.kubeConfig ?? defaultKubeConfig();
    this.api = kubeConfig.makeApiClient(CoreV1Api);
    this.namespace = options.namespace ?? process.env.POD_NAMESPACE ?? ownNamespace();
    this.cacheMs = options.cacheMs ?? 5000;
    this.minRelistMs = options.minRelistMs ?? 1000;
  }

  async lookup(node: string): Promise<PeerAddress | undefined> {
    const age = Date.now() - this.listedAtMs;
    const doubtful = this.invalidated || !this.nodes.has(node);
    const stale = age > this.cacheMs || (doubtful && age > this.minRelistMs);
    if (stale) await this.relist();
    return this.nodes.get(node);
  }

  invalidate(_node: string): void {
    // The next lookup lists again (still at most once per minRelistMs).
    this.invalidated = true;
  }

  close(): void {}

  /** One list at a time; callers arriving meanwhile share it. A failed list keeps the last known addresses. */
  private relist(): Promise<void> {
    this.listing ??= (async () => {
      try {
        const list = await this.api.listNamespacedPod({
          namespace: this.namespace,
          labelSelector: this.options.podSelector,
        });
        this.nodes = addressesByNode(list.items, this.options.port);
      } catch (err) {
        this.logger.warn(
          { namespace: this.namespace, selector: this.options.podSelector, err: errorText(err) },
          'listing the peer pods failed; using the addresses known before',
        );
      } finally {
        this.listedAtMs = Date.now();
        this.invalidated = false;
        this.listing = undefined;
      }
    })();
    return this.listing;
  }
}

/**
 * Node → address of its running plugin pod. A pod being deleted or without an IP serves nothing; of two
 * pods on one node (a replacement starting) the newer one wins.
 */
export function addressesByNode(pods: readonly V1Pod[], port: number): Map<string, PeerAddress> {
  const newest = new Map<string, { startedMs: number; address: PeerAddress }>();
  for (const pod of pods) {
    const node = pod.spec?.nodeName;
    const ip = pod.status?.podIP;
    if (!node || !ip || pod.metadata?.deletionTimestamp || pod.status?.phase !== 'Running') continue;
    const startedMs = new Date(pod.status?.startTime ?? pod.metadata?.creationTimestamp ?? 0).getTime();
    const address = ip.includes(':') ? `[${ip}]:${port}` : `${ip}:${port}`;
    const seen = newest.get(node);
    if (!seen || startedMs >= seen.startedMs) newest.set(node, { startedMs, address });
  }
  return new Map([...newest].map(([node, { address }]) => [node, address]));
}

function defaultKubeConfig(): KubeConfig {
  const kubeConfig = new KubeConfig();
  kubeConfig.loadFromDefault();
  return kubeConfig;
}

function ownNamespace(): string {
  try {
    return fs.readFileSync(SERVICE_ACCOUNT_NAMESPACE, 'utf8').trim();
  } catch {
    throw new Error(
      `--peer-discovery kubernetes: no namespace given (--peer-namespace or POD_NAMESPACE) and ${SERVICE_ACCOUNT_NAMESPACE} is unreadable`,
    );
  }
}

function errorText(err: unknown): string {
  const body = (err as { body?: unknown }).body;
  const message = err instanceof Error ? err.message : String(err);
  return typeof body === 'string' && body !== '' ? `${message}: ${body.slice(0, 500)}` : message;
}
