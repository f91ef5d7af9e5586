//! Real plankton images from the planktonclas wheel (placeholder, being written).
