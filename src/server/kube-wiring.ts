/**
 * Everything that talks to kube-apiserver, loaded only in delegated mode: the Kubernetes client is
 * a large module that stand-alone mode never needs (it costs about 60 MiB of memory).
 */
import type { X509Certificate } from 'node:crypto';
import { CoreV1Api, KubeConfig } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import type { Config } from '../config.ts';
import { AUTHENTICATION_CONFIGMAP } from '../auth/authentication-configmap.ts';
import { subjectAccessReviewAuthorizer, tokenReviewAuthenticator } from '../auth/delegated.ts';
import { requestHeaderAuthenticator } from '../auth/request-header.ts';
import { unionAuthenticator } from '../auth/types.ts';
import { x509Authenticator } from '../auth/x509.ts';
import { kubeAccessReviewer, kubeTokenReviewer, watchAuthenticationConfig } from '../kube/auth-clients.ts';
import type { AuthWiring } from './server.ts';

export { createClusterInputs } from '../controller/cluster-inputs.ts';
export { createLeaderElector, kubeLeaseClient } from '../controller/leader-election.ts';
export { kubeEventRecorder } from '../kube/events.ts';
export { createJobBuilder } from '../build/job-builder.ts';
export { createClusterOperatorWriter } from '../gate/cluster-operator.ts';

export function kubeConfigOf(config: Config): KubeConfig {
  const kc = new KubeConfig();
  if (config.kubeconfig) kc.loadFromFile(config.kubeconfig);
  else kc.loadFromCluster();
  return kc;
}

const NO_CERTIFICATES: readonly X509Certificate[] = [];

export async function delegatedAuth(config: Config, kc: KubeConfig, logger: Logger, onChange: () => void): Promise<AuthWiring> {
  const watch = watchAuthenticationConfig(kc, logger.child({ component: 'authentication' }), onChange);
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    watch.ready,
    new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new Error(
              `could not read ${AUTHENTICATION_CONFIGMAP.namespace}/${AUTHENTICATION_CONFIGMAP.name} from ${kc.getCurrentCluster()?.server ?? 'the cluster'} within 60 s: check the kubeconfig and the extension-apiserver-authentication-reader RoleBinding`,
            ),
          ),
        60_000,
      );
    }),
  ]).finally(() => clearTimeout(timer));
  return {
    authenticator: unionAuthenticator(
      requestHeaderAuthenticator(() => watch.current()?.requestHeader),
      x509Authenticator(() => watch.current()?.clientCa ?? NO_CERTIFICATES),
      tokenReviewAuthenticator(kubeTokenReviewer(kc), {
        successTtlMs: config.authenticationCacheTtlSeconds * 1000,
        failureTtlMs: config.authenticationCacheTtlSeconds * 1000,
      }),
    ),
    authorizer: subjectAccessReviewAuthorizer(kubeAccessReviewer(kc), {
      allowTtlMs: config.authorizationAllowTtlSeconds * 1000,
      denyTtlMs: config.authorizationDenyTtlSeconds * 1000,
    }),
    clientCas: () => {
      const c = watch.current();
      return c ? [c.clientCaPem, c.requestHeaderCaPem] : [];
    },
    stop: () => watch.stop(),
  };
}


/** The architectures of the cluster's nodes, most common first (empty when none can be read). */
export async function nodeArchitectures(kc: KubeConfig, logger: Logger): Promise<string[]> {
  try {
    const nodes = await kc.makeApiClient(CoreV1Api).listNode({});
    const count = new Map<string, number>();
    for (const n of nodes.items) {
      const a = n.status?.nodeInfo?.architecture;
      if (a) count.set(a, (count.get(a) ?? 0) + 1);
    }
    return [...count].sort((x, y) => y[1] - x[1]).map(([a]) => a);
  } catch (err) {
    logger.warn({ error: (err as Error).message }, 'could not list the nodes to learn their architectures');
    return [];
  }
}
