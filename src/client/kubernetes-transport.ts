/**
 * The Kubernetes transport: the csi-snapshot-metadata sidecar in front of the driver, reached the way a
 * backup pod reaches it. For a VolumeSnapshot it finds the driver (VolumeSnapshot → bound
 * VolumeSnapshotContent → spec.driver), that driver's SnapshotMetadataService (cluster-scoped, named
 * after the driver: address, CA, audience), requests a token for the caller's own ServiceAccount bound to
 * that audience (TokenRequest), and calls the Kubernetes SnapshotMetadata API over TLS trusting only the
 * service's CA. Requests name VolumeSnapshots; a delta's base is the CSI handle of the older snapshot.
 *
 * API server failures come back as ConnectErrors with the matching gRPC code (404 NOT_FOUND, 403
 * PERMISSION_DENIED, 401 UNAUTHENTICATED, unreachable UNAVAILABLE), so the client types them like the
 * sidecar's own. @kubernetes/client-node is loaded on first use: it is large, and CSI-direct users never
 * need it.
 */
import type { KubeConfig } from '@kubernetes/client-node';
import { Code, ConnectError, createClient, type Client } from '@connectrpc/connect';
import { createGrpcTransport, Http2SessionManager } from '@connectrpc/connect-node';
import { BlockMetadataType as WireType, SnapshotMetadata } from '../gen/cbt/v1alpha1/schema_pb.js';
import { asUnavailable, flatten } from './csi-direct-transport.js';
import { InvalidArgumentError, SnapshotMetadataError } from './errors.js';
import type { MetadataPage, MetadataRequest, MetadataTransport } from './types.js';

type ClientNode = typeof import('@kubernetes/client-node');

export interface KubernetesTransportOptions {
  /** Namespace of the VolumeSnapshots. */
  namespace: string;
  /**
   * How to reach the API server as the caller. Default: `kubeconfig` if given, else client-node's default
   * ($KUBECONFIG, ~/.kube/config, else the pod's in-cluster ServiceAccount).
   */
  kubeConfig?: KubeConfig;
  /** Path of a kubeconfig file to load instead of the default. */
  kubeconfig?: string;
  /** The ServiceAccount the token is requested for. Default: the caller's own (a SelfSubjectReview). */
  serviceAccount?: { namespace: string; name: string };
  /** The CSI driver, if known; default: read from each snapshot's VolumeSnapshotContent. */
  driver?: string;
  /** Lifetime asked for the sidecar's token, in seconds. Default 600 (the upstream iterator's). */
  tokenExpirySeconds?: number;
}

/** What Kubernetes says about a VolumeSnapshot that is ready to use. */
export interface VolumeSnapshotFacts {
  namespace: string;
  name: string;
  /** The CSI snapshot handle: the bound VolumeSnapshotContent's status.snapshotHandle. */
  snapshotHandle: string;
  /** The CSI driver (the content's spec.driver). */
  driver: string;
  contentName: string;
  /** The snapshot's size in bytes (status.restoreSize), when reported. */
  restoreSizeBytes: number | null;
  /** The CSI volume it was taken of (the content's spec.source.volumeHandle); null for a pre-provisioned content. */
  sourceVolumeHandle: string | null;
  /**
   * When the driver cut it, in milliseconds since the epoch: the content's status.creationTime (the CSI
   * creation_time csi-snapshotter copied there, in nanoseconds), or null while it has none.
   */
  creationTimeMs: number | null;
}

/** The sidecar of one driver, as its SnapshotMetadataService describes it. */
interface ServiceEndpoint {
  address: string;
  audience: string;
  session: Http2SessionManager;
  client: Client<typeof SnapshotMetadata>;
}

const SNAPSHOT_GROUP = 'snapshot.storage.k8s.io';
const CBT_GROUP = 'cbt.storage.k8s.io';
const SERVICE_ACCOUNT_USER = /^system:serviceaccount:([^:]+):([^:]+)$/;

export class KubernetesTransport implements MetadataTransport {
  readonly namespace: string;
  private api: Promise<{ k8s: ClientNode; config: KubeConfig }> | undefined;
  private readonly endpoints = new Map<string, Promise<ServiceEndpoint>>();
  private readonly drivers = new Map<string, string>();
  private identity: Promise<{ namespace: string; name: string }> | undefined;
  private token: { audience: string; value: string; renewAt: number } | undefined;

  constructor(private readonly options: KubernetesTransportOptions) {
    if (!options.namespace) throw new Error('the namespace of the VolumeSnapshots is required');
    this.namespace = options.namespace;
  }

  async *open(request: MetadataRequest, signal: AbortSignal): AsyncIterable<MetadataPage> {
    const snapshotName = request.kind === 'allocated' ? request.snapshot : request.target;
    let endpoint: ServiceEndpoint;
    let token: string;
    try {
      const driver =
        this.options.driver ?? this.drivers.get(snapshotName) ?? (await this.snapshot(snapshotName)).driver;
      endpoint = await this.endpoint(driver);
      token = await this.securityToken(endpoint.audience);
    } catch (err) {
      throw signal.aborted || err instanceof SnapshotMetadataError ? err : asConnectError(err);
    }
    const stream =
      request.kind === 'allocated'
        ? endpoint.client.getMetadataAllocated(
            {
              securityToken: token,
              namespace: this.namespace,
              snapshotName: request.snapshot,
              startingOffset: BigInt(request.startingOffset),
              maxResults: request.maxResults,
            },
            { signal },
          )
        : endpoint.client.getMetadataDelta(
            {
              securityToken: token,
              namespace: this.namespace,
              baseSnapshotId: request.base,
              targetSnapshotName: request.target,
              startingOffset: BigInt(request.startingOffset),
              maxResults: request.maxResults,
            },
            { signal },
          );
    try {
      for await (const res of stream) {
        yield {
          blockMetadataType: res.blockMetadataType === WireType.FIXED_LENGTH ? 'FIXED_LENGTH' : 'VARIABLE_LENGTH',
          capacityBytes: Number(res.volumeCapacityBytes),
          tuples: flatten(res.blockMetadata),
        };
      }
    } catch (err) {
      throw signal.aborted ? err : asUnavailable(err, `the snapshot metadata service at ${endpoint.address}`);
    }
  }

  /**
   * A VolumeSnapshot of the namespace and its bound content. Rejects with NOT_FOUND when either is
   * missing, UNAVAILABLE while it is not ready to use (snapshot-controller has not bound it yet).
   */
  async snapshot(name: string): Promise<VolumeSnapshotFacts> {
    const { k8s, config } = await this.kube();
    const custom = config.makeApiClient(k8s.CustomObjectsApi);
    const where = `VolumeSnapshot ${this.namespace}/${name}`;
    const vs = (await custom
      .getNamespacedCustomObject({
        group: SNAPSHOT_GROUP,
        version: 'v1',
        namespace: this.namespace,
        plural: 'volumesnapshots',
        name,
      })
      .catch((err: unknown) => {
        throw apiError(err, where);
      })) as {
      status?: { boundVolumeSnapshotContentName?: string; readyToUse?: boolean; restoreSize?: string };
    };
    const contentName = vs.status?.boundVolumeSnapshotContentName;
    if (!contentName || vs.status?.readyToUse !== true)
      throw new ConnectError(`${where} is not ready to use yet (not bound to a ready content)`, Code.Unavailable);
    const content = (await custom
      .getClusterCustomObject({
        group: SNAPSHOT_GROUP,
        version: 'v1',
        plural: 'volumesnapshotcontents',
        name: contentName,
      })
      .catch((err: unknown) => {
        throw apiError(err, `VolumeSnapshotContent ${contentName} of ${where}`);
      })) as {
      spec?: { driver?: string; source?: { volumeHandle?: string } };
      status?: { snapshotHandle?: string; readyToUse?: boolean; creationTime?: unknown };
    };
    const handle = content.status?.snapshotHandle;
    const driver = content.spec?.driver;
    if (!handle || !driver || content.status?.readyToUse !== true)
      throw new ConnectError(
        `VolumeSnapshotContent ${contentName} of ${where} is not ready to use yet`,
        Code.Unavailable,
      );
    this.drivers.set(name, driver);
    return {
      namespace: this.namespace,
      name,
      snapshotHandle: handle,
      driver,
      contentName,
      restoreSizeBytes: vs.status?.restoreSize ? quantityBytes(vs.status.restoreSize) : null,
      sourceVolumeHandle: content.spec?.source?.volumeHandle ?? null,
      creationTimeMs: nanosecondsToMs(content.status?.creationTime),
    };
  }

  close(): void {
    for (const endpoint of this.endpoints.values())
      endpoint.then(
        (e) => e.session.abort(),
        () => undefined,
      );
    this.endpoints.clear();
  }

  private kube(): Promise<{ k8s: ClientNode; config: KubeConfig }> {
    this.api ??= import('@kubernetes/client-node').then((k8s) => {
      let config = this.options.kubeConfig;
      if (!config) {
        config = new k8s.KubeConfig();
        try {
          if (this.options.kubeconfig) config.loadFromFile(this.options.kubeconfig);
          else config.loadFromDefault();
        } catch (err) {
          // Bad input, not an outage: not retried.
          // The first line: a YAML parser's message goes on with a code frame of the file.
          const text = (err instanceof Error ? err.message : String(err)).split('\n')[0]!.trim();
          const which = this.options.kubeconfig ?? 'the default kubeconfig';
          throw new InvalidArgumentError('INVALID_ARGUMENT', `${which} cannot be loaded: ${text}`, text, {
            cause: err,
          });
        }
      }
      return { k8s, config };
    });
    return this.api;
  }

  /** The driver's SnapshotMetadataService, dialled once. */
  private endpoint(driver: string): Promise<ServiceEndpoint> {
    let endpoint = this.endpoints.get(driver);
    if (!endpoint) {
      endpoint = this.connect(driver);
      this.endpoints.set(driver, endpoint);
      endpoint.catch(() => this.endpoints.delete(driver));
    }
    return endpoint;
  }

  private async connect(driver: string): Promise<ServiceEndpoint> {
    const { k8s, config } = await this.kube();
    const where = `SnapshotMetadataService ${driver}`;
    const sms = (await config
      .makeApiClient(k8s.CustomObjectsApi)
      .getClusterCustomObject({
        group: CBT_GROUP,
        version: 'v1beta1',
        plural: 'snapshotmetadataservices',
        name: driver,
      })
      .catch((err: unknown) => {
        throw apiError(err, `${where} (does driver ${driver} serve changed block tracking?)`);
      })) as { spec?: { address?: string; caCert?: string; audience?: string } };
    const { address, caCert, audience } = sms.spec ?? {};
    if (!address || !caCert || !audience)
      throw new ConnectError(`${where} lacks spec.address, spec.caCert or spec.audience`, Code.FailedPrecondition);
    // caCert is base64 of the PEM (a []byte in the CRD's Go type).
    const ca = Buffer.from(caCert, 'base64').toString();
    const baseUrl = `https://${address}`;
    const session = new Http2SessionManager(baseUrl, { pingIntervalMs: 30_000 }, { ca });
    const transport = createGrpcTransport({ baseUrl, sessionManager: session });
    return { address, audience, session, client: createClient(SnapshotMetadata, transport) };
  }

  /** A token of the caller's ServiceAccount for `audience`, renewed once half its life is gone. */
  private async securityToken(audience: string): Promise<string> {
    const now = Date.now();
    if (this.token && this.token.audience === audience && now < this.token.renewAt) return this.token.value;
    const { k8s, config } = await this.kube();
    const sa = await this.serviceAccount();
    const expirationSeconds = this.options.tokenExpirySeconds ?? 600;
    const res = await config
      .makeApiClient(k8s.CoreV1Api)
      .createNamespacedServiceAccountToken({
        name: sa.name,
        namespace: sa.namespace,
        body: {
          apiVersion: 'authentication.k8s.io/v1',
          kind: 'TokenRequest',
          spec: { audiences: [audience], expirationSeconds },
        },
      })
      .catch((err: unknown) => {
        throw apiError(err, `a token for ServiceAccount ${sa.namespace}/${sa.name} (audience ${audience})`);
      });
    const value = res.status?.token;
    if (!value) throw new ConnectError('the TokenRequest returned no token', Code.Internal);
    const expiration = res.status?.expirationTimestamp;
    const expires = expiration ? new Date(expiration).getTime() : now + expirationSeconds * 1000;
    this.token = { audience, value, renewAt: now + (expires - now) / 2 };
    return value;
  }

  /** The ServiceAccount to request tokens for: the option, else who the API server says the caller is. */
  private serviceAccount(): Promise<{ namespace: string; name: string }> {
    if (this.options.serviceAccount) return Promise.resolve(this.options.serviceAccount);
    this.identity ??= (async () => {
      const { k8s, config } = await this.kube();
      const review = await config
        .makeApiClient(k8s.AuthenticationV1Api)
        .createSelfSubjectReview({ body: { apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' } })
        .catch((err: unknown) => {
          throw apiError(err, 'who the caller is (SelfSubjectReview)');
        });
      const user = review.status?.userInfo?.username ?? '';
      const m = SERVICE_ACCOUNT_USER.exec(user);
      if (!m)
        throw new ConnectError(
          `the caller is ${user || 'anonymous'}, not a ServiceAccount: tokens for the sidecar are requested for a ServiceAccount (pass serviceAccount)`,
          Code.InvalidArgument,
        );
      return { namespace: m[1]!, name: m[2]! };
    })();
    this.identity.catch(() => {
      this.identity = undefined;
    });
    return this.identity;
  }
}

/** A failed API server call as the gRPC status a client would get for it. */
function apiError(err: unknown, what: string): ConnectError {
  const status = (err as { code?: unknown }).code;
  const httpStatus = typeof status === 'number' ? status : undefined;
  const body = (err as { body?: unknown }).body;
  let reason = err instanceof Error ? err.message : String(err);
  if (typeof body === 'string') {
    try {
      reason = (JSON.parse(body) as { message?: string }).message ?? reason;
    } catch {
      // Not a Kubernetes Status: keep the error's own message.
    }
  } else if (typeof (body as { message?: unknown } | undefined)?.message === 'string') {
    reason = (body as { message: string }).message;
  }
  const code =
    httpStatus === 404
      ? Code.NotFound
      : httpStatus === 403
        ? Code.PermissionDenied
        : httpStatus === 401
          ? Code.Unauthenticated
          : httpStatus === 400 || httpStatus === 422
            ? Code.InvalidArgument
            : Code.Unavailable;
  const text =
    code === Code.NotFound
      ? `${what} does not exist`
      : httpStatus === undefined
        ? `${what}: the API server is unreachable`
        : `${what}: the API server answered ${httpStatus}`;
  return new ConnectError(`${text}: ${reason}`, code, undefined, undefined, err);
}

function asConnectError(err: unknown): unknown {
  return err instanceof ConnectError ? err : apiError(err, 'the API server');
}

const QUANTITY = /^([0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$/;
const FACTOR: Record<string, number> = {
  Ki: 2 ** 10,
  Mi: 2 ** 20,
  Gi: 2 ** 30,
  Ti: 2 ** 40,
  Pi: 2 ** 50,
  Ei: 2 ** 60,
  k: 1e3,
  M: 1e6,
  G: 1e9,
  T: 1e12,
  P: 1e15,
  E: 1e18,
};

/** A Kubernetes quantity in bytes (the integral forms a restoreSize takes); null if it is another form. */
export function quantityBytes(q: string): number | null {
  const m = QUANTITY.exec(q);
  if (!m) return null;
  const n = Number(m[1]) * (m[2] ? FACTOR[m[2]]! : 1);
  return Number.isSafeInteger(n) ? n : null;
}

/**
 * An int64 of nanoseconds, as JSON.parse gives it (a double: exact to 256 ns at today's times), in whole
 * milliseconds; null when absent.
 */
function nanosecondsToMs(ns: unknown): number | null {
  return typeof ns === 'number' && Number.isFinite(ns) && ns > 0 ? Math.floor(ns / 1e6) : null;
}
