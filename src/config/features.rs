//! `--feature-gates` / `featureGates`, as kube-proxy v1.33 parses them.
//!
//! kube-proxy shares Kubernetes' one gate registry, so it accepts every Kubernetes gate name,
//! refuses names it does not know ("unrecognized feature gate") and refuses to move a gate that
//! is locked to its default (GA or deprecated gates). The gates kube-proxy itself reads, and the
//! component-base ones (logging, metrics), are listed with their v1.33 state; kproxy reads the
//! ones that change what it does. Other components' gates are accepted and have no effect, as
//! in kube-proxy.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Alpha,
    Beta,
    Ga,
    /// Deprecated gates: AllAlpha/AllBeta do not move them.
    Deprecated,
}

/// One gate as kube-proxy v1.33 registers it.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub name: &'static str,
    pub default: bool,
    pub stage: Stage,
    /// Setting a locked gate to anything but its default is an error.
    pub locked: bool,
}

const fn gate(name: &'static str, default: bool, stage: Stage, locked: bool) -> Gate {
    Gate {
        name,
        default,
        stage,
        locked,
    }
}

/// Gates kube-proxy's code reads, and component-base's, in their v1.33 state.
pub const KUBE_PROXY_GATES: &[Gate] = &[
    gate("AllAlpha", false, Stage::Alpha, false),
    gate("AllBeta", false, Stage::Beta, false),
    gate("ComponentFlagz", false, Stage::Alpha, false),
    gate("ComponentSLIs", true, Stage::Ga, true),
    gate("ComponentStatusz", false, Stage::Alpha, false),
    gate("ContextualLogging", true, Stage::Beta, false),
    gate("LoadBalancerIPMode", true, Stage::Ga, true),
    gate("LoggingAlphaOptions", false, Stage::Alpha, false),
    gate("LoggingBetaOptions", true, Stage::Beta, false),
    gate("NFTablesProxyMode", true, Stage::Ga, true),
    gate("PreferSameTrafficDistribution", false, Stage::Alpha, false),
    gate("ServiceTrafficDistribution", true, Stage::Ga, true),
    gate("TopologyAwareHints", true, Stage::Ga, true),
    gate("WinDSR", true, Stage::Beta, false),
    gate("WinOverlay", true, Stage::Beta, false),
    gate("WindowsHostNetwork", false, Stage::Deprecated, false),
];

/// Other Kubernetes gates the shared registry holds that are locked to their v1.33 default (GA or
/// deprecated with LockToDefault): accepted only with that value, no effect here.
pub const OTHER_LOCKED_GATES: &[Gate] = &[
    gate("AllowServiceLBStatusOnNonLB", false, Stage::Deprecated, true),
    gate("AnyVolumeDataSource", true, Stage::Ga, true),
    gate("BtreeWatchCache", true, Stage::Ga, true),
    gate("CPUManagerPolicyOptions", true, Stage::Ga, true),
    gate("CRDValidationRatcheting", true, Stage::Ga, true),
    gate("CronJobsScheduledAnnotation", true, Stage::Ga, true),
    gate("CSIMigrationPortworx", true, Stage::Ga, true),
    gate("CustomResourceFieldSelectors", true, Stage::Ga, true),
    gate("DevicePluginCDIDevices", true, Stage::Ga, true),
    gate("ElasticIndexedJob", true, Stage::Ga, true),
    gate("HonorPVReclaimPolicy", true, Stage::Ga, true),
    gate("JobBackoffLimitPerIndex", true, Stage::Ga, true),
    gate("JobSuccessPolicy", true, Stage::Ga, true),
    gate("LogarithmicScaleDown", true, Stage::Ga, true),
    gate("MatchLabelKeysInPodAffinity", true, Stage::Ga, true),
    gate("MemoryManager", true, Stage::Ga, true),
    gate("NodeInclusionPolicyInPodTopologySpread", true, Stage::Ga, true),
    gate("PodDisruptionConditions", true, Stage::Ga, true),
    gate("PodIndexLabel", true, Stage::Ga, true),
    gate("PodSchedulingReadiness", true, Stage::Ga, true),
    gate("RecursiveReadOnlyMounts", true, Stage::Ga, true),
    gate("RetryGenerateName", true, Stage::Ga, true),
    gate("ServiceAccountTokenJTI", true, Stage::Ga, true),
    gate("ServiceAccountTokenNodeBinding", true, Stage::Ga, true),
    gate("ServiceAccountTokenNodeBindingValidation", true, Stage::Ga, true),
    gate("ServiceAccountTokenPodNodeInfo", true, Stage::Ga, true),
    gate("SidecarContainers", true, Stage::Ga, true),
    gate("SizeMemoryBackedVolumes", true, Stage::Ga, true),
    gate("StatefulSetAutoDeletePVC", true, Stage::Ga, true),
    gate("StatefulSetStartOrdinal", true, Stage::Ga, true),
    gate("StrictCostEnforcementForVAP", true, Stage::Ga, true),
    gate("StrictCostEnforcementForWebhooks", true, Stage::Ga, true),
    gate("StructuredAuthorizationConfiguration", true, Stage::Ga, true),
    gate("WatchFromStorageWithoutResourceVersion", false, Stage::Deprecated, true),
];

/// Other Kubernetes gates the shared registry holds (kube, apiserver, apiextensions, controller-manager
/// and client-go ones, as kube-proxy v1.33 registers them): accepted with any value, no effect here.
pub const OTHER_GATES: &[&str] = &[
    "AggregatedDiscoveryRemoveBetaType",
    "AllowDNSOnlyNodeCSR",
    "AllowInsecureKubeletCertificateSigningRequests",
    "AllowOverwriteTerminationGracePeriodSeconds",
    "AllowParsingUserUIDFromCertAuth",
    "AllowUnsafeMalformedObjectDeletion",
    "AnonymousAuthConfigurableEndpoints",
    "APIResponseCompression",
    "APIServerIdentity",
    "APIServerTracing",
    "APIServingWithRoutine",
    "AuthorizeNodeWithSelectors",
    "AuthorizeWithSelectors",
    "CBORServingAndStorage",
    "ClientsAllowCBOR",
    "ClientsPreferCBOR",
    "CloudControllerManagerWebhook",
    "ClusterTrustBundle",
    "ClusterTrustBundleProjection",
    "ConcurrentWatchObjectDecode",
    "ConsistentListFromCache",
    "ContainerCheckpoint",
    "ContainerStopSignals",
    "CoordinatedLeaderElection",
    "CPUManagerPolicyAlphaOptions",
    "CPUManagerPolicyBetaOptions",
    "CrossNamespaceVolumeDataSource",
    "CSIVolumeHealth",
    "CustomCPUCFSQuotaPeriod",
    "DeclarativeValidation",
    "DeclarativeValidationTakeover",
    "DeploymentReplicaSetTerminatingReplicas",
    "DisableAllocatorDualWrite",
    "DisableCPUQuotaWithExclusiveCPUs",
    "DisableNodeKubeProxyVersion",
    "DRAAdminAccess",
    "DRADeviceTaints",
    "DRAPartitionableDevices",
    "DRAPrioritizedList",
    "DRAResourceClaimDeviceStatus",
    "DynamicResourceAllocation",
    "EventedPLEG",
    "ExecProbeTimeout",
    "ExternalServiceAccountTokenSigner",
    "GitRepoVolumeDriver",
    "GracefulNodeShutdown",
    "GracefulNodeShutdownBasedOnPodPriority",
    "HPAConfigurableTolerance",
    "HPAScaleToZero",
    "ImageMaximumGCAge",
    "ImageVolume",
    "InformerResourceVersion",
    "InOrderInformers",
    "InPlacePodVerticalScaling",
    "InPlacePodVerticalScalingAllocatedStatus",
    "InPlacePodVerticalScalingExclusiveCPUs",
    "InTreePluginPortworxUnregister",
    "JobManagedBy",
    "JobPodReplacementPolicy",
    "KMSv1",
    "KubeletCgroupDriverFromCRI",
    "KubeletCrashLoopBackOffMax",
    "KubeletEnsureSecretPulledImages",
    "KubeletFineGrainedAuthz",
    "KubeletInUserNamespace",
    "KubeletPodResourcesDynamicResources",
    "KubeletPodResourcesGet",
    "KubeletPSI",
    "KubeletRegistrationGetOnExistsOnly",
    "KubeletSeparateDiskGC",
    "KubeletServiceAccountTokenForCredentialProviders",
    "KubeletTracing",
    "LegacySidecarContainers",
    "ListFromCacheSnapshot",
    "LocalStorageCapacityIsolationFSQuotaMonitoring",
    "MatchLabelKeysInPodTopologySpread",
    "MaxUnavailableStatefulSet",
    "MemoryQoS",
    "MultiCIDRServiceAllocator",
    "MutableCSINodeAllocatableCount",
    "MutatingAdmissionPolicy",
    "NodeLogQuery",
    "NodeSwap",
    "OpenAPIEnums",
    "OrderedNamespaceDeletion",
    "PodAndContainerStatsFromCRI",
    "PodDeletionCost",
    "PodLevelResources",
    "PodLifecycleSleepAction",
    "PodLifecycleSleepActionAllowZero",
    "PodLogsQuerySplitStreams",
    "PodObservedGenerationTracking",
    "PodReadyToStartContainersCondition",
    "PodTopologyLabelsAdmission",
    "PortForwardWebsockets",
    "ProcMountType",
    "QOSReserved",
    "RecoverVolumeExpansionFailure",
    "ReduceDefaultCrashLoopBackOffDecay",
    "RelaxedDNSSearchValidation",
    "RelaxedEnvironmentVariableValidation",
    "ReloadKubeletServerCertificateFile",
    "RemoteRequestHeaderUID",
    "ResilientWatchCacheInitialization",
    "ResourceHealthStatus",
    "RotateKubeletServerCertificate",
    "RuntimeClassInImageCriApi",
    "SchedulerAsyncPreemption",
    "SchedulerPopFromBackoffQ",
    "SchedulerQueueingHints",
    "SELinuxChangePolicy",
    "SELinuxMount",
    "SELinuxMountReadWriteOncePod",
    "SeparateCacheWatchRPC",
    "SeparateTaintEvictionController",
    "ServiceAccountNodeAudienceRestriction",
    "StorageCapacityScoring",
    "StorageNamespaceIndex",
    "StorageVersionAPI",
    "StorageVersionHash",
    "StorageVersionMigrator",
    "StreamingCollectionEncodingToJSON",
    "StreamingCollectionEncodingToProtobuf",
    "StrictIPCIDRValidation",
    "StructuredAuthenticationConfiguration",
    "SupplementalGroupsPolicy",
    "SystemdWatchdog",
    "TopologyManagerPolicyAlphaOptions",
    "TopologyManagerPolicyBetaOptions",
    "TopologyManagerPolicyOptions",
    "TranslateStreamCloseWebsocketRequests",
    "UnauthenticatedHTTP2DOSMitigation",
    "UnknownVersionInteroperabilityProxy",
    "UserNamespacesPodSecurityStandards",
    "UserNamespacesSupport",
    "VolumeAttributesClass",
    "WatchCacheInitializationPostStartHook",
    "WatchList",
    "WatchListClient",
    "WindowsCPUAndMemoryAffinity",
    "WindowsGracefulNodeShutdown",
];

/// The effective gates: every kube-proxy gate's value, after the operator's settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeatureGates {
    /// What the operator set, as given (written back by `--write-config-to`).
    pub set: BTreeMap<String, bool>,
}

impl FeatureGates {
    /// Validates `set` as kube-proxy's `SetFromMap` does; the error names the gate.
    pub fn new(set: BTreeMap<String, bool>) -> Result<FeatureGates, String> {
        for (name, value) in &set {
            let known = KUBE_PROXY_GATES
                .iter()
                .chain(OTHER_LOCKED_GATES)
                .find(|g| g.name == name);
            match known {
                Some(g) if g.locked && *value != g.default => {
                    return Err(format!(
                        "cannot set feature gate {name} to {value}, feature is locked to {}",
                        g.default
                    ))
                }
                Some(_) => {}
                None if OTHER_GATES.contains(&name.as_str()) => {}
                None => return Err(format!("unrecognized feature gate: {name}")),
            }
        }
        Ok(FeatureGates { set })
    }

    /// Whether a kube-proxy gate is on (AllAlpha/AllBeta move unset gates of that stage).
    pub fn enabled(&self, name: &str) -> bool {
        if let Some(v) = self.set.get(name) {
            return *v;
        }
        let Some(g) = KUBE_PROXY_GATES.iter().find(|g| g.name == name) else {
            return false;
        };
        match g.stage {
            Stage::Alpha if self.set.get("AllAlpha") == Some(&true) => true,
            Stage::Beta if self.set.contains_key("AllBeta") => self.set["AllBeta"],
            _ => g.default,
        }
    }
}

/// `--feature-gates A=true,B=false` (pflag's mapStringBool: repeated flags add up).
pub fn parse_feature_gates_flag(raw: &str, into: &mut BTreeMap<String, bool>) -> Result<(), String> {
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("missing bool value for {pair}"));
        };
        let v =
            super::parse_go_bool(v.trim()).ok_or_else(|| format!("invalid value of {k}={v}, err: invalid syntax"))?;
        into.insert(k.trim().to_string(), v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates(pairs: &[(&str, bool)]) -> Result<FeatureGates, String> {
        FeatureGates::new(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn unknown_and_locked_gates_are_errors() {
        assert!(gates(&[("NoSuchGate", true)])
            .unwrap_err()
            .contains("unrecognized feature gate: NoSuchGate"));
        assert!(gates(&[("NFTablesProxyMode", false)])
            .unwrap_err()
            .contains("locked to true"));
        assert!(gates(&[("NFTablesProxyMode", true), ("SidecarContainers", true)]).is_ok());
        // Locked gates outside kube-proxy's own set are refused too, as the shared registry does.
        assert!(gates(&[("SidecarContainers", false)])
            .unwrap_err()
            .contains("cannot set feature gate SidecarContainers to false, feature is locked to true"));
        assert!(gates(&[("WatchFromStorageWithoutResourceVersion", true)])
            .unwrap_err()
            .contains("locked to false"));
        assert!(gates(&[("ComponentSLIs", false)])
            .unwrap_err()
            .contains("locked to true"));
        // Removed before v1.33 (KubeProxyDrainingTerminatingNodes in 1.33) or added after it.
        for name in [
            "KubeProxyDrainingTerminatingNodes",
            "CPUManager",
            "SizeBasedListCostEstimate",
        ] {
            assert!(gates(&[(name, true)])
                .unwrap_err()
                .contains("unrecognized feature gate"));
        }
        // Unlocked GA / deprecated gates take any value.
        assert!(gates(&[("ExecProbeTimeout", false), ("MultiCIDRServiceAllocator", false)]).is_ok());
        assert!(gates(&[("WindowsHostNetwork", true), ("LegacySidecarContainers", true)]).is_ok());
    }

    #[test]
    fn each_gate_is_listed_once() {
        let mut names: Vec<&str> = KUBE_PROXY_GATES
            .iter()
            .chain(OTHER_LOCKED_GATES)
            .map(|g| g.name)
            .collect();
        names.extend(OTHER_GATES);
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        assert!(OTHER_LOCKED_GATES
            .iter()
            .all(|g| g.locked && matches!(g.stage, Stage::Ga | Stage::Deprecated)));
    }

    #[test]
    fn defaults_and_all_alpha() {
        let g = gates(&[]).unwrap();
        assert!(g.enabled("LoggingBetaOptions") && !g.enabled("LoggingAlphaOptions"));
        let g = gates(&[("AllAlpha", true)]).unwrap();
        assert!(g.enabled("LoggingAlphaOptions") && g.enabled("PreferSameTrafficDistribution"));
        // Deprecated gates do not follow AllAlpha.
        assert!(!g.enabled("WindowsHostNetwork"));
        let mut set = BTreeMap::new();
        parse_feature_gates_flag("LoggingAlphaOptions=true, AllBeta=false", &mut set).unwrap();
        let g = FeatureGates::new(set).unwrap();
        assert!(g.enabled("LoggingAlphaOptions") && !g.enabled("LoggingBetaOptions"));
        assert!(parse_feature_gates_flag("X", &mut BTreeMap::new()).is_err());
    }
}
