/**
 * The OpenShift-native soft gate (DESIGN §5): a `config.openshift.io/v1` ClusterOperator named
 * `kmm-preflight` whose `Upgradeable` condition says whether the cluster's next release has every
 * current Module verified. The cluster-version operator refuses minor upgrades while an operator
 * is `Upgradeable=False` (an administrator may still force one), so this blocks the same upgrades
 * the webhook refuses, and shows why in `oc get clusteroperators` and the console.
 *
 * The next release is the ClusterVersion's pending `spec.desiredUpdate` (its image, or its version
 * looked up in the available and conditional updates) when one is set and differs from what the
 * cluster runs; otherwise the release of the newest PreflightValidationOCP, the one an
 * administrator prepares. None of either: `Upgradeable=False`, saying which object to create
 * (unless there are no Modules at all). `Available` and `Degraded` report this server's own health
 * (the gate's inputs read, storage answering). Related objects list the namespace and every
 * PreflightValidationOCP, so `oc adm must-gather` collects them.
 *
 * The operator object is created when missing; its status is written through the status
 * subresource, only when something changed, keeping `lastTransitionTime` of unchanged
 * conditions. Every replica runs the writer: they compute the same status from the same storage,
 * and a write that lost a race (409) is simply done again on the next pass. Without the
 * ClusterOperator API (not OpenShift) the writer says so once and keeps quiet.
 */
import { ApisApi, CustomObjectsApi, type KubeConfig } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import type { KubeObject } from '../api/resources.ts';
import { describeKubeError, kubeStatusCode } from '../kube/errors.ts';
import { type ClusterVersion } from './cluster-version.ts';
import { createCommand, cut, describeVerdict, releaseVerdict, type GateInputs, type ReleaseVerdict } from './release-verdict.ts';

export const CLUSTER_OPERATOR_NAME = 'kmm-preflight';
const GROUP = 'config.openshift.io';
const VERSION = 'v1';
const MAX_MESSAGE = 1024;

export interface OperatorCondition {
  readonly type: string;
  readonly status: 'True' | 'False' | 'Unknown';
  readonly reason: string;
  readonly message: string;
  readonly lastTransitionTime?: string;
}

export interface ClusterOperatorStatus {
  readonly conditions: readonly OperatorCondition[];
  readonly versions: readonly { readonly name: string; readonly version: string }[];
  readonly relatedObjects: readonly { readonly group: string; readonly resource: string; readonly namespace?: string; readonly name: string }[];
}

export interface OperatorInputs {
  readonly gate: GateInputs;
  /** Whether the gate can judge (its inputs have been read). */
  readonly gateReady: boolean;
  /** The cluster's ClusterVersion `version`, when there is one. */
  readonly clusterVersion?: ClusterVersion;
  /** Undefined when healthy, else why not (e.g. storage unreachable). */
  readonly problem?: string;
  readonly namespace: string;
  readonly version: string;
}

/** The release the cluster goes to next: a pending desired update, else the newest validation's. */
export function nextRelease(cv: ClusterVersion | undefined, validations: readonly KubeObject[]): { image: string; version?: string; source: 'desiredUpdate' | 'validation' } | undefined {
  const du = cv?.spec?.desiredUpdate;
  if (du && du.mode !== 'Preflight') {
    const lookups = [...(cv?.status?.availableUpdates ?? []), ...(cv?.status?.conditionalUpdates ?? []).map((c) => c.release ?? {})];
    const image = du.image || lookups.find((r) => du.version && r.version === du.version)?.image;
    if (image && image !== cv?.status?.desired?.image) return { image, ...(du.version ? { version: du.version } : {}), source: 'desiredUpdate' };
  }
  const live = validations.filter((v) => !v.metadata.deletionTimestamp);
  const newest = live.sort((a, b) => String(b.metadata.creationTimestamp ?? '').localeCompare(String(a.metadata.creationTimestamp ?? '')) || String(b.metadata.name).localeCompare(String(a.metadata.name)))[0];
  const image = (newest?.spec as { releaseImage?: unknown } | undefined)?.releaseImage;
  return typeof image === 'string' ? { image, source: 'validation' } : undefined;
}

/** The status the operator should have now (conditions without transition times). */
export function desiredOperatorStatus(i: OperatorInputs): ClusterOperatorStatus {
  const conditions: OperatorCondition[] = [];
  let validations: readonly KubeObject[] = [];
  if (!i.gateReady) {
    conditions.push({ type: 'Upgradeable', status: 'False', reason: 'Starting', message: 'kmm-preflight has not read the cluster\'s Modules and validations yet' });
  } else {
    validations = i.gate.validations();
    const next = nextRelease(i.clusterVersion, validations);
    const modules = i.gate.modules().length;
    if (!next && modules > 0) {
      conditions.push({
        type: 'Upgradeable',
        status: 'False',
        reason: 'NoPreflightValidation',
        message: `No PreflightValidationOCP exists and no update is pending: ${modules} Module(s) are not verified for any release. Create a PreflightValidationOCP for the release you plan to upgrade to (spec.releaseImage: its pull spec by digest).`,
      });
    } else if (!next) {
      conditions.push({ type: 'Upgradeable', status: 'True', reason: 'NoModules', message: 'There are no KMM Modules: nothing can fail to load on a new kernel.' });
    } else {
      const v: ReleaseVerdict = releaseVerdict(next.image, i.gate, next.version ? { version: next.version } : {});
      const what = next.source === 'desiredUpdate' ? `the desired update ${next.version ?? ''} (${next.image})`.replace('  ', ' ') : `release ${next.image}, the newest PreflightValidationOCP's`;
      const message = v.verified
        ? `Every Module is verified for ${what}: ${v.message}`
        : `Not every Module is verified for ${what}: ${describeVerdict(v, 120)}. To fix: ${v.reason === 'NoValidation' ? createCommand(next.image, next.version) : v.remedy}`;
      conditions.push({ type: 'Upgradeable', status: v.verified ? 'True' : 'False', reason: v.reason, message: cut(message, MAX_MESSAGE) });
    }
  }
  conditions.push(
    i.problem
      ? { type: 'Available', status: 'False', reason: 'Unhealthy', message: cut(i.problem, MAX_MESSAGE) }
      : { type: 'Available', status: 'True', reason: 'AsExpected', message: 'kmm-preflight serves PreflightValidation(OCP) and judges upgrades' },
    i.problem
      ? { type: 'Degraded', status: 'True', reason: 'Unhealthy', message: cut(i.problem, MAX_MESSAGE) }
      : { type: 'Degraded', status: 'False', reason: 'AsExpected', message: 'kmm-preflight is healthy' },
    { type: 'Progressing', status: 'False', reason: 'AsExpected', message: 'kmm-preflight has nothing to roll out' },
  );
  return {
    conditions,
    versions: [{ name: 'operator', version: i.version }],
    relatedObjects: [
      { group: '', resource: 'namespaces', name: i.namespace },
      ...validations
        .map((v) => v.metadata.name!)
        .sort()
        .map((name) => ({ group: 'kmm.sigs.x-k8s.io', resource: 'preflightvalidationsocp', name })),
    ],
  };
}

/** `next` with the transition times of `prev` kept where a condition's status did not change. */
export function withTransitionTimes(next: ClusterOperatorStatus, prev: Partial<ClusterOperatorStatus> | undefined, now: string): ClusterOperatorStatus {
  return {
    ...next,
    conditions: next.conditions.map((c) => {
      const p = prev?.conditions?.find((x) => x.type === c.type);
      return { ...c, lastTransitionTime: p && p.status === c.status && p.lastTransitionTime ? p.lastTransitionTime : now };
    }),
  };
}


export interface ClusterOperatorWriterOptions {
  readonly kubeConfig: KubeConfig;
  readonly gate: GateInputs & { readonly ready: boolean };
  readonly logger: Logger;
  /** Resolves when this server is healthy (storage answering); rejects with why not. */
  readonly health: () => Promise<void>;
  readonly namespace: string;
  readonly version: string;
  /** Between two passes (default 10 s). */
  readonly intervalMs?: number;
  readonly now?: () => Date;
}

export interface ClusterOperatorWriter {
  /** One pass: read, compute, create or write when changed. Never throws. */
  sync(): Promise<void>;
  start(): void;
  stop(): Promise<void>;
}

export function createClusterOperatorWriter(o: ClusterOperatorWriterOptions): ClusterOperatorWriter {
  const api = o.kubeConfig.makeApiClient(CustomObjectsApi);
  const discovery = o.kubeConfig.makeApiClient(ApisApi);
  const log = o.logger.child({ component: 'cluster-operator' });
  const now = o.now ?? (() => new Date());
  /** No ClusterOperator API, or no access to it: looked at again only every 5 minutes. */
  let absent = false;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> = Promise.resolve();
  let stopped = false;

  const readClusterVersion = async (): Promise<ClusterVersion | undefined> => {
    try {
      return (await api.getClusterCustomObject({ group: GROUP, version: VERSION, plural: 'clusterversions', name: 'version' })) as ClusterVersion;
    } catch (err) {
      if (kubeStatusCode(err) === 404) return undefined;
      throw err;
    }
  };

  /** Whether the cluster serves config.openshift.io/v1 (discovery needs no grant); asked until it does. */
  let served = false;
  const openShift = async (): Promise<boolean> => {
    if (served) return true;
    const groups = await discovery.getAPIVersions();
    served = groups.groups.some((g) => g.name === GROUP && g.versions.some((v) => v.version === VERSION));
    return served;
  };

  const pass = async () => {
    if (!(await openShift())) {
      if (!absent) log.info('this cluster has no config.openshift.io/v1 API (not OpenShift): the ClusterOperator gate is off; the webhook and the Verified condition still gate upgrades');
      absent = true;
      return;
    }
    absent = false;
    let current: { metadata?: { resourceVersion?: string }; status?: Partial<ClusterOperatorStatus> } | undefined;
    try {
      current = (await api.getClusterCustomObject({ group: GROUP, version: VERSION, plural: 'clusteroperators', name: CLUSTER_OPERATOR_NAME })) as typeof current;
    } catch (err) {
      if (kubeStatusCode(err) !== 404) throw err;
      try {
        current = (await api.createClusterCustomObject({
          group: GROUP,
          version: VERSION,
          plural: 'clusteroperators',
          body: { apiVersion: `${GROUP}/${VERSION}`, kind: 'ClusterOperator', metadata: { name: CLUSTER_OPERATOR_NAME }, spec: {} },
        })) as typeof current;
        log.info('ClusterOperator kmm-preflight created');
        absent = false;
      } catch (createErr) {
        if (kubeStatusCode(createErr) === 404) {
          if (!absent) log.info('this cluster has no config.openshift.io/v1 ClusterOperator API (not OpenShift): the ClusterOperator gate is off; the webhook and the Verified condition still gate upgrades');
          absent = true;
          return;
        }
        throw createErr;
      }
    }
    let problem: string | undefined;
    try {
      await o.health();
    } catch (err) {
      problem = `kmm-preflight is unhealthy: ${(err as Error).message}`;
    }
    const desired = desiredOperatorStatus({
      gate: o.gate,
      gateReady: o.gate.ready,
      clusterVersion: await readClusterVersion(),
      ...(problem ? { problem } : {}),
      namespace: o.namespace,
      version: o.version,
    });
    const status = withTransitionTimes(desired, current?.status, now().toISOString().replace(/\.\d{3}Z$/, 'Z'));
    if (JSON.stringify(status) === JSON.stringify({ conditions: current?.status?.conditions, versions: current?.status?.versions, relatedObjects: current?.status?.relatedObjects })) return;
    await api.replaceClusterCustomObjectStatus({
      group: GROUP,
      version: VERSION,
      plural: 'clusteroperators',
      name: CLUSTER_OPERATOR_NAME,
      body: { apiVersion: `${GROUP}/${VERSION}`, kind: 'ClusterOperator', metadata: { name: CLUSTER_OPERATOR_NAME, resourceVersion: current?.metadata?.resourceVersion }, status: { ...current?.status, ...status } },
    });
    const upgradeable = status.conditions.find((c) => c.type === 'Upgradeable');
    log.info({ upgradeable: upgradeable?.status, reason: upgradeable?.reason }, 'ClusterOperator status written');
  };

  const sync = async () => {
    try {
      await pass();
    } catch (err) {
      if (kubeStatusCode(err) === 409) return; // another replica wrote first; the next pass compares again
      log.warn({ error: describeKubeError(err) }, 'could not write the ClusterOperator status; trying again');
    }
  };

  return {
    sync,
    start() {
      const tick = () => {
        running = sync().finally(() => {
          if (!stopped) timer = setTimeout(tick, absent ? 5 * 60_000 : (o.intervalMs ?? 10_000));
        });
      };
      tick();
    },
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      await running;
    },
  };
}
