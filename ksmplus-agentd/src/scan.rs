//! Duplicate-page scanner over /proc/PID/{maps,pagemap,mem} (issue 5).
